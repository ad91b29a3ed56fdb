import os, time, statistics
N=2000
buf=b'x'*4096
def run(mode):
    p=f'/work/soak-tmp/fs/{mode}.dat'
    if os.path.exists(p): os.unlink(p)
    fd=os.open(p, os.O_RDWR|os.O_CREAT, 0o644)
    if mode=='zeroed':
        z=b'\0'*(1<<20)
        for i in range((N*4096)//(1<<20)+1): os.write(fd,z)
        os.fsync(fd)
    elif mode=='fallocate':
        os.posix_fallocate(fd,0,N*4096+4096); os.fsync(fd)
    lat=[]
    for i in range(N):
        os.pwrite(fd,buf,i*4096)
        t=time.perf_counter(); os.fdatasync(fd); lat.append((time.perf_counter()-t)*1e6)
    os.close(fd); os.unlink(p)
    lat.sort()
    return lat[len(lat)//2], lat[len(lat)*9//10], lat[len(lat)*99//100]
for r in range(2):
    for m in ['append','zeroed','fallocate']:
        print(m, 'p50/p90/p99 us: %.0f %.0f %.0f' % run(m))
