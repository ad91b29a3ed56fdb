import sys,collections
# q.py folded FRAME [depth]: inclusive total of FRAME, and inclusive by next frame under it (first occurrence)
f,frame=sys.argv[1],sys.argv[2]; depth=int(sys.argv[3]) if len(sys.argv)>3 else 1
tot=0; total=0; kids=collections.Counter()
for line in open(f):
    s,c=line.rsplit(' ',1); c=int(c); total+=c
    fr=s.split(';')
    idx=[i for i,x in enumerate(fr) if frame in x]
    if not idx: continue
    i=idx[0]; tot+=c
    kid=';'.join(x[:70] for x in fr[i+1:i+1+depth]) or '<self>'
    kids[kid]+=c
print(f"{frame}: {tot} of {total} = {100*tot/total:.1f}%")
for k,c in kids.most_common(25): print(f"  {100*c/total:5.1f}%  {k}")
