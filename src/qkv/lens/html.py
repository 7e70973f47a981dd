"""The standalone HTML view of an `ExplainResult`: one file, inline CSS and JS, no network.

The record is embedded column-wise as base64 float32/int32 arrays (≈ 16 bytes per kept key and
head), so a 512-token text with every key of every head kept stays a few MB. Nothing in the
page references another host: the embedded JSON escapes "/" so even a URL inside the text
is not a live reference.
"""

from __future__ import annotations

import base64
import html
import json
import os
import secrets

import numpy as np

from .io import write_atomic
from .lookup import LAYER_KEYS
from .record import ExplainResult, dtype_words


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def pack(r: ExplainResult) -> dict:
    """The record in the page's compact form (columns concatenated over heads / layers)."""
    heads, idx, score, weight, contrib = [], [], [], [], []
    layers, lidx, lweight, lcontrib = [], [], [], []
    off = loff = 0
    for lay in r.layers:
        layers.append([lay.layer, lay.top_weight, lay.top_contribution, loff, len(lay.index)])
        lidx.append(lay.index), lweight.append(lay.weight), lcontrib.append(lay.contribution)
        loff += len(lay.index)
        for h in lay.heads:
            heads.append(
                [
                    lay.layer,
                    h.head,
                    h.kv_head,
                    h.entropy,
                    h.output_norm,
                    h.n_keys,
                    h.top_weight,
                    h.top_contribution,
                    off,
                    len(h.index),
                    h.sink,  # a learned sink's weight (gpt-oss), else 0
                ]
            )
            s = np.where(np.isfinite(h.score), h.score, np.nan)
            (
                idx.append(h.index),
                score.append(s),
                weight.append(h.weight),
                contrib.append(h.contribution),
            )
            off += len(h.index)

    def cat(parts: list, dtype: str) -> str:
        return _b64(np.concatenate(parts) if parts else np.zeros(0), dtype)

    m = r.model
    return {
        "model": {
            "name": m.name,
            "causal": m.causal,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads,
        },
        "text": r.text,
        "tokens": [[t.text, t.start, t.end] for t in r.tokens],
        "query": r.query.index,
        "key": None if r.key is None else r.key.index,
        "top": r.top,
        "layer_top": max(r.top, LAYER_KEYS) if r.top else 0,  # keys a layer keeps, each way
        "notes": r.notes,
        "heads": heads,
        "idx": cat(idx, "<i4"),
        "score": cat(score, "<f4"),
        "weight": cat(weight, "<f4"),
        "contrib": cat(contrib, "<f4"),
        "layers": layers,
        "lidx": cat(lidx, "<i4"),
        "lweight": cat(lweight, "<f4"),
        "lcontrib": cat(lcontrib, "<f4"),
        "prop": {
            name: {"through": p.through_layer, "values": _b64(p.values, "<f4")}
            for name, p in (("flow", r.flow), ("rollout", r.rollout))
            if p is not None
        },
        "neuron": _neuron(r),
    }


NEURON_DIMS = 16  # dimensions drawn in the neuron view's bar chart


def recorded_score(r: ExplainResult) -> float | None:
    """The record's own score for the neuron view's (layer, head, key), when the record keeps it."""
    v = r.neuron
    try:
        k = r.head(v.layer, v.head).key(v.key.index)
    except (IndexError, ValueError):
        return None
    return None if k is None or not np.isfinite(k.score) else k.score


def _neuron(r: ExplainResult) -> dict | None:
    """The neuron view in the page's form: every number computed here, the page only draws."""
    v = r.neuron
    if v is None:
        return None
    top = v.top(NEURON_DIMS)
    p = v.product
    return {
        "layer": v.layer,
        "head": v.head,
        "kv_head": v.kv_head,
        "query": [v.query.index, v.query.text],
        "key": [v.key.index, v.key.text],
        "d": len(v.q),
        "rope_dims": v.rope_dims,
        "dot": v.dot,
        "scale": v.scale,
        "score": v.score,
        "recorded": recorded_score(r),
        "dims": [int(d) for d in top],
        "q": [float(v.q[d]) for d in top],
        "k": [float(v.k[d]) for d in top],
        "product": [float(p[d]) for d in top],
        "share": [float(x) for x in v.share(NEURON_DIMS)],
    }


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:16px 20px}
h1{font-size:18px;margin:0 0 4px}.sub{color:#666;margin-bottom:10px}
.notes{color:#555;font-size:13px;margin:0 0 12px;padding-left:18px}
.controls{display:flex;gap:14px;align-items:center;flex-wrap:wrap;margin:8px 0 12px}
select,button{font:inherit;padding:2px 6px}
#text{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;white-space:pre-wrap;line-height:2.1;max-height:340px;overflow:auto}
#text span{border-radius:3px;cursor:pointer;padding:1px 0}
#text span.q{outline:2px solid #d62728;outline-offset:1px;margin:0 3px}
#text span.pin{box-shadow:0 0 0 2px #1f77b4;margin:0 3px}
#text span.sp{color:#999;font-size:11px}
#text span.pc{color:#999;font-size:11px;vertical-align:super}
.row{display:flex;gap:20px;flex-wrap:wrap;margin-top:14px}
.panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;overflow:auto}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 6px;text-align:right}th{color:#555;font-weight:600}
td.l,th.l{text-align:left}
.bar{display:inline-block;height:9px;background:#4c78a8;vertical-align:middle;margin-right:4px}
.bar.c{background:#f58518}
.sink,.less{color:#b35900}
#grid td{width:18px;height:16px;padding:0;border:1px solid #fff;cursor:pointer}
#grid td.sel{outline:2px solid #d62728}
#grid th{font-weight:400;font-size:11px}
#neuron{margin-top:14px}#neuron svg text{font-size:11px;font-family:ui-monospace,monospace}
.ident{font-family:ui-monospace,monospace;margin:4px 0 8px}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;font-size:12px;padding:4px 7px;border-radius:4px;display:none;white-space:pre}
"""

JS = r"""
const D = JSON.parse(document.getElementById('qkv-data').textContent);
function bytes(b){const s=atob(b),u=new Uint8Array(s.length);for(let i=0;i<s.length;i++)u[i]=s.charCodeAt(i);return u.buffer;}
const f32=b=>new Float32Array(bytes(b)), i32=b=>new Int32Array(bytes(b));
const IDX=i32(D.idx),SC=f32(D.score),W=f32(D.weight),C=f32(D.contrib);
const LIDX=i32(D.lidx),LW=f32(D.lweight),LC=f32(D.lcontrib);
const PROP={};for(const k in D.prop)PROP[k]=f32(D.prop[k].values);
const PROPNAME={flow:'contribution flow',rollout:'attention rollout'};
const N=D.tokens.length, $=id=>document.getElementById(id);
const CP=Array.from(D.text), cps=(a,b)=>CP.slice(a,b).join(''); // offsets count code points, as Python's do
const layers=[...new Set(D.heads.map(h=>h[0]))], headsOf=l=>D.heads.filter(h=>h[0]===l);
const st={layer:layers[0], head:-1, qty:'weight', pin:D.key};
const tt=j=>{const s=D.tokens[j][0].trim();return s||D.tokens[j][0];};
const isProp=()=>st.qty in PROP;
function keys(){ // {j:[score,weight,contrib]} for the selection; a propagation: {j:[NaN,share,share]}
  const out=new Map();
  if(isProp()){const P=PROP[st.qty];for(let j=0;j<N;j++)out.set(j,[NaN,P[j],P[j]]);return out;}
  if(st.head<0){const L=D.layers.find(x=>x[0]===st.layer);for(let r=L[3];r<L[3]+L[4];r++)out.set(LIDX[r],[NaN,LW[r],LC[r]]);return out;}
  const h=D.heads.find(x=>x[0]===st.layer&&x[1]===st.head);for(let r=h[8];r<h[8]+h[9];r++)out.set(IDX[r],[SC[r],W[r],C[r]]);return out;
}
function weightOn(h,j){for(let r=h[8];r<h[8]+h[9];r++)if(IDX[r]===j)return W[r];return null;}
function fmt(x){return x===null||isNaN(x)?'—':(Math.abs(x)>=100?x.toFixed(0):x.toPrecision(3));}
function drawText(){
  const K=keys(),col=st.qty==='contribution'?[245,133,24]:[76,120,168];
  let mx=0;K.forEach(v=>{const x=st.qty==='contribution'?v[2]:v[1];if(x>mx)mx=x;});
  const el=$('text');el.textContent='';let pos=0;
  D.tokens.forEach((t,j)=>{if(t[1]<t[2]&&t[1]>pos){el.appendChild(document.createTextNode(cps(pos,t[1])));}
    // the text is shown once: a token shows the characters not yet shown; a later piece of a
    // character split over several tokens shows a small mark (its label is in the tooltip)
    const own=t[1]===t[2]?t[0]+' ':cps(Math.max(pos,t[1]),t[2]);pos=Math.max(pos,t[2]);
    const s=document.createElement('span');s.textContent=own||'⁺';
    if(t[1]===t[2])s.className='sp';else if(!own)s.className='pc';
    const v=K.get(j);const x=v?(st.qty==='contribution'?v[2]:v[1]):0;
    if(x>0)s.style.background=`rgba(${col},${Math.min(1,x/(mx||1))*0.85})`;
    if(j===D.query)s.classList.add('q');if(j===st.pin)s.classList.add('pin');
    s.onmousemove=e=>tip(e,`${JSON.stringify(tt(j))} (token ${j})`+(!v?'\n(not among the kept keys)':isProp()?`\n${PROPNAME[st.qty]} share ${fmt(v[1])}`:st.head<0?`\nmean weight ${fmt(v[1])}  content carried ${fmt(v[2])}`:`\nscore ${fmt(v[0])}  weight ${fmt(v[1])}  contribution ${fmt(v[2])}`));
    s.onmouseleave=()=>$('tip').style.display='none';
    s.onclick=()=>{st.pin=j;draw();};el.appendChild(s);});
  if(pos<CP.length)el.appendChild(document.createTextNode(cps(pos)));
}
function tip(e,s){const t=$('tip');t.textContent=s;t.style.display='block';t.style.left=(e.clientX+12)+'px';t.style.top=(e.clientY+12)+'px';}
const SHOW_ALL=200; // a head keeping more keys (top=0) shows its top 100 by weight and by contribution
function shown(K){ // every kept key, ranked by weight; past SHOW_ALL the union of both top-100s
  const byW=[...K].sort((a,b)=>b[1][1]-a[1][1]);if(byW.length<=SHOW_ALL)return [byW,0];
  const keep=new Set([...byW.slice(0,100),...[...K].sort((a,b)=>b[1][2]-a[1][2]).slice(0,100)].map(k=>k[0]));
  const out=byW.filter(k=>keep.has(k[0]));return [out,byW.length-out.length];
}
function drawProp(){
  const P=[...keys().entries()].sort((a,b)=>b[1][1]-a[1][1]).slice(0,20),mx=Math.max(1e-12,...P.map(k=>k[1][1]));
  let h=`<table><tr><th>#</th><th class=l>token</th><th>idx</th><th class=l>share</th></tr>`;
  P.forEach(([j,v],r)=>{h+=`<tr><td>${r+1}</td><td class=l>${esc(tt(j))}</td><td>${j}</td><td class=l><span class=bar style="width:${80*v[1]/mx}px"></span>${fmt(v[1])}</td></tr>`;});
  const top=P.length?P[0][1][1]:0,cav=top>0.9?`<div class=sink>${fmt(top)} on one token: the product has converged there (a sink) and says little about this text.</div>`:'';
  $('keys').innerHTML=`<b>${PROPNAME[st.qty]} through layer ${D.prop[st.qty].through}</b> (shares sum to 1)`+cav+h+'</table>';
}
function contentMark(wr,rc,exact,w){ // the terminal's rule (lens/terminal.py content_flag)
  return rc>wr+1&&w>0.05?'carries less':(exact&&rc+2<wr?'carries more':'');
}
function drawKeys(){
  if(isProp())return drawProp();
  const all=[...keys().entries()],[K,hidden]=shown(all);
  const mw=Math.max(1e-12,...K.map(k=>k[1][1])),mc=Math.max(1e-12,...K.map(k=>k[1][2]));
  const byC=[...all].sort((a,b)=>b[1][2]-a[1][2]).map(k=>k[0]);
  const mean=st.head<0; // the layer's own numbers: mean_h w and ‖Σ_h w·v W_O‖, not one head's ‖w·v W_O‖
  let h=`<table><tr><th>#</th><th class=l>key</th><th>idx</th><th>score</th><th class=l>${mean?'mean weight':'weight'}</th><th class=l>${mean?'content carried ‖Σ_h w·v W_O‖':'contribution'}</th><th>rank by content</th></tr>`;
  // a cut record keeps the top k by weight ∪ by content (a layer: k = layer_top): a rank by
  // content among the kept keys is the true rank up to k, past k only a lower bound ("> k")
  const lim=mean?D.layer_top:D.top,nvis=Math.max(...D.heads.filter(x=>x[0]===st.layer).map(x=>x[5]));
  const cut=lim>0&&all.length<nvis;
  K.forEach(([j,v],r)=>{const rc=byC.indexOf(j)+1,exact=!cut||rc<=lim,mark=contentMark(r+1,rc,exact,v[1]);
    h+=`<tr><td>${r+1}</td><td class=l>${esc(tt(j))}</td><td>${j}</td><td>${fmt(v[0])}</td>`+
    `<td class=l><span class=bar style="width:${80*v[1]/mw}px"></span>${fmt(v[1])}</td>`+
    `<td class=l><span class="bar c" style="width:${80*v[2]/mc}px"></span>${fmt(v[2])}</td><td class="${mark==='carries less'?'less':''}">${exact?rc:'> '+lim}${mark?' '+mark:''}</td></tr>`;});
  const what=mean?`layer ${st.layer}: mean weight over heads vs the content carried (‖Σ_h w·v W_O‖)`:`layer ${st.layer} head ${st.head}`;
  let extra='';if(st.head>=0){const hh=D.heads.find(x=>x[0]===st.layer&&x[1]===st.head);extra=` · entropy ${fmt(Math.abs(hh[3]))} nats · ‖output‖ ${fmt(hh[4])} · ${hh[5]} keys visible`+(hh[10]?` · the learned sink takes ${fmt(hh[10])} of the weight`:'');}
  const kept=` · ${all.length} keys kept`+(hidden?` (${hidden} more, beyond the top 100 by weight and by contribution, are in the JSON)`:'');
  $('keys').innerHTML=`<b>${what}</b>${extra}${kept}`+h+'</table>';
}
function esc(s){return s.replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function drawGrid(){
  const pin=st.pin;let h=`<b>weight ${esc(JSON.stringify(tt(D.query)))} → ${pin===null?'(click a token)':esc(JSON.stringify(tt(pin)))} by layer × head</b><table><tr><th></th>`;
  const H=D.model.n_heads;for(let k=0;k<H;k++)h+=`<th>${k}</th>`;h+='</tr>';
  layers.forEach(l=>{h+=`<tr><th>${l}</th>`;const hs=headsOf(l);for(let k=0;k<H;k++){const x=hs.find(y=>y[1]===k);
    if(!x){h+='<td></td>';continue;}const w=pin===null?null:weightOn(x,pin);
    const bg=w===null?'#eee':`rgba(214,39,40,${Math.min(1,w)})`,sel=l===st.layer&&k===st.head?' class=sel':'';
    h+=`<td${sel} style="background:${bg}" data-l=${l} data-h=${k} title="layer ${l} head ${k}: ${w===null?'not kept':w.toFixed(3)}"></td>`;}
    h+='</tr>';});
  $('grid').innerHTML=h+'</table>';
  $('grid').querySelectorAll('td[data-l]').forEach(td=>td.onclick=()=>{st.layer=+td.dataset.l;st.head=+td.dataset.h;syncControls();draw();});
}
function drawNeuron(){ // the record's neuron view: its numbers as given, drawn as signed bars
  const V=D.neuron,el=$('neuron');if(!V){el.style.display='none';return;}
  const f6=x=>x===null?'—':x.toPrecision(6),row=18,lw=250,bw=160,mid=lw+bw;
  const mx=Math.max(1e-12,...V.product.map(Math.abs));
  let svg=`<svg width="${mid+bw+70}" height="${row*V.dims.length+24}">`+
    `<line x1="${mid}" y1="0" x2="${mid}" y2="${row*V.dims.length+4}" stroke="#888"/>`;
  V.dims.forEach((d,r)=>{const p=V.product[r],w=bw*Math.abs(p)/mx,y=r*row+2;
    svg+=`<text x="0" y="${y+12}">d ${d}  q ${V.q[r].toFixed(3)}  k ${V.k[r].toFixed(3)}</text>`+
      `<rect class="nbar" data-d="${d}" data-p="${p}" x="${p<0?mid-w:mid}" y="${y}" width="${w}" height="${row-5}" fill="${p<0?'#4c78a8':'#e45756'}"/>`+
      `<text x="${p<0?mid+4:mid-4}" y="${y+12}" text-anchor="${p<0?'start':'end'}">${p.toFixed(3)}</text>`;});
  svg+=`<text x="${mid}" y="${row*V.dims.length+20}" text-anchor="middle">q_d·k_d (red +, blue −); running share of Σ after ${V.dims.length} dims: ${f6(V.share[V.share.length-1])}</text></svg>`;
  const rope=V.rope_dims?`after RoPE (${V.rope_dims} of ${V.d} dims rotated)`:'no RoPE';
  el.innerHTML=`<b>Q·K neuron view · layer ${V.layer} head ${V.head} (kv head ${V.kv_head}) · ${esc(JSON.stringify(V.query[1].trim()||V.query[1]))} (token ${V.query[0]}) · ${esc(JSON.stringify(V.key[1].trim()||V.key[1]))} (token ${V.key[0]})</b> · d = ${V.d}, q and k ${rope}`+
    `<div class=ident>Σ<sub>d</sub> q<sub>d</sub>·k<sub>d</sub> = <span id=ndot>${f6(V.dot)}</span> × scale <span id=nscale>${f6(V.scale)}</span> = score <span id=nscore>${f6(V.score)}</span>`+
    ` <span class=sub>(the record's score for this key: <span id=nrec>${f6(V.recorded)}</span>)</span></div>`+
    `<div class=sub>top ${V.dims.length} of ${V.d} dimensions by |q_d·k_d|</div>`+svg;
}
function syncControls(){$('layer').value=st.layer;fillHeads();$('head').value=st.head;}
function fillHeads(){const s=$('head');s.innerHTML='<option value=-1>mean of heads</option>'+headsOf(st.layer).map(h=>`<option value=${h[1]}>${h[1]}</option>`).join('');}
function draw(){ // the "show" menu names the layer's content in the mean-of-heads view
  $('qty').querySelector('option[value=contribution]').textContent=st.head<0?'content carried ‖Σ_h w·v W_O‖':'contribution ‖w·v W_O‖';
  drawText();drawKeys();drawGrid();}
$('layer').innerHTML=layers.map(l=>`<option value=${l}>${l}</option>`).join('');
for(const k of ['flow','rollout'])if(!(k in PROP))$('qty').querySelector(`option[value=${k}]`).remove();
$('layer').onchange=e=>{st.layer=+e.target.value;fillHeads();st.head=-1;draw();};
$('head').onchange=e=>{st.head=+e.target.value;draw();};
$('qty').onchange=e=>{st.qty=e.target.value;draw();};
if(D.heads.length===1){st.head=D.heads[0][1];}
if(st.pin===null&&D.heads.length){ // the grid opens on the key with the most weight over the
  // kept rows, the first token, special tokens and the query aside (else the first head's top)
  const tot=new Float64Array(N);for(let r=0;r<IDX.length;r++)tot[IDX[r]]+=W[r];
  let best=-1;for(let j=1;j<N;j++)if(j!==D.query&&D.tokens[j][1]<D.tokens[j][2]&&(best<0||tot[j]>tot[best]))best=j;
  st.pin=best>=0&&tot[best]>0?best:D.heads[0][7];}
syncControls();draw();drawNeuron();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qkv explain — {title}</title>
<style>{css}</style></head>
<body><main>
<h1>What {query} looks up</h1>
<div class="sub">{sub}</div>
<ul class="notes">{notes}</ul>
<div class="controls">
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<label>show <select id="qty"><option value="weight">weight (softmax)</option>
<option value="contribution">contribution ‖w·v W_O‖</option><option value="flow">contribution flow (all layers)</option><option value="rollout">attention rollout (all layers)</option></select></label>
<span class="sub">Click a token to see which heads send the query to it; click a cell to open that head.</span>
</div>
<div id="text"></div>
<div class="row"><div class="panel" id="keys"></div><div class="panel" id="grid"></div></div>
<div class="panel" id="neuron"></div>
<div id="tip"></div>
</main>
<script type="application/json" id="qkv-data">{data}</script>
<script>{js}</script>
</body></html>
"""


def _esc(s: str) -> str:
    return html.escape(s).replace("/", "&#47;")  # a URL in the user's text stays inert text


def page(r: ExplainResult) -> str:
    """The whole standalone HTML document."""
    data = json.dumps(pack(r), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    data = data.replace("/", "\\/")  # "\/" is JSON for "/": no live URL, no </script>
    m = r.model
    q = _esc(repr(r.query.text.strip() or r.query.text))
    kept = "all keys" if r.top == 0 else f"top {r.top} keys per head"
    sub = (
        f"{_esc(m.name)} · {'causal' if m.causal else 'bidirectional'} · {m.n_layers} layers × "
        f"{m.n_heads} heads{dtype_words(m, ' · ')} · {len(r.tokens)} tokens · query {q} "
        f"(token {r.query.index}) · {kept}"
    )
    notes = "".join(f"<li>{_esc(n)}</li>" for n in r.notes)
    return PAGE.format(title=q, css=CSS, query=q, sub=sub, notes=notes, data=data, js=JS)


def to_html(
    r: ExplainResult, path: str | os.PathLike | None = None, *, fragment: bool = False
) -> str:
    """The standalone page (also written atomically to `path`); `fragment=True` wraps it in a
    sandboxed iframe for notebooks (`_repr_html_`)."""
    doc = page(r)
    if path is not None:
        write_atomic(path, doc)
    if fragment:
        fid = secrets.token_hex(4)
        return (
            f'<iframe id="qkv-{fid}" sandbox="allow-scripts" style="width:100%;height:760px;border:1px solid #ddd" '
            f'srcdoc="{html.escape(doc, quote=True)}"></iframe>'
        )
    return doc
