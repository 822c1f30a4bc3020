import json,glob,statistics,random,sys
d=sys.argv[1]
def load(v):
    out={}
    for f in sorted(glob.glob(f'{d}/{v}-*.json')):
        j=json.load(open(f))
        for r in j['results']:
            w=r.get('workload') or r.get('name')
            for k,x in r.get('results',{}).items():
                m=x.get('msgs_per_s',{}).get('median') if isinstance(x,dict) else None
                if m: out.setdefault(k,[]).append(m)
            if 'msgs_per_s' in r: out.setdefault(w,[]).append(r['msgs_per_s']['median'])
    return out
b=load('before');a=load('after')
random.seed(1)
print('| variant | runs | before msg/s | after msg/s | after / before | 95 % interval |')
print('|---|---|---|---|---|---|')
for k in sorted(set(a)|set(b)):
    if k not in a or k not in b: continue
    mb,ma=statistics.median(b[k]),statistics.median(a[k])
    iv=''
    if len(a[k])>=4 and len(b[k])>=4:
        rs=[]
        for _ in range(5000):
            rs.append(statistics.median(random.choices(a[k],k=len(a[k])))/statistics.median(random.choices(b[k],k=len(b[k]))))
        rs.sort(); iv=f'{rs[125]:.3f} – {rs[4875]:.3f}'
    print(f'| `{k}` | {len(b[k])} / {len(a[k])} | {mb:,.0f} | {ma:,.0f} | {ma/mb:.3f} | {iv} |')
