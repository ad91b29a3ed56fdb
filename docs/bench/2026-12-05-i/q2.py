import sys,collections
# q2.py folded FRAME N: inclusive by the N-th frame after FRAME (first occurrence), showing just that frame
f,frame,n=sys.argv[1],sys.argv[2],int(sys.argv[3]); total=0; kids=collections.Counter(); tot=0
for line in open(f):
    s,c=line.rsplit(' ',1); c=int(c); total+=c
    fr=s.split(';'); idx=[i for i,x in enumerate(fr) if frame in x]
    if not idx: continue
    i=idx[0]; tot+=c
    kids[fr[i+n][:150] if i+n<len(fr) else '<self>']+=c
print(f"{frame}: {100*tot/total:.1f}%")
for k,c in kids.most_common(int(sys.argv[4]) if len(sys.argv)>4 else 20): print(f"  {100*c/total:5.1f}%  {k}")
