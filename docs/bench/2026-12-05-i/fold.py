import sys,re,collections
# fold perf script output: stacks root..leaf joined by ';'
stacks=collections.Counter(); cur=[]; 
def flush():
    global cur
    if cur: stacks[';'.join(reversed(cur))]+=1
    cur=[]
for line in open(sys.argv[1],errors='replace'):
    line=line.rstrip('\n')
    if not line.strip(): flush(); continue
    if line[0] not in ' \t': flush(); cur=[]; continue
    parts=line.strip().split(' ',1)
    if len(parts)<2: continue
    sym=parts[1]; sym=re.sub(r'\+0x[0-9a-f]+ ',' ',sym); sym=re.sub(r' \(.*\)$','',sym)
    cur.append(sym)
flush()
with open(sys.argv[2],'w') as f:
    for s,c in stacks.items(): f.write(f"{s} {c}\n")
