// A minimal DOM for running the page's script in node: enough for getElementById, innerHTML,
// createElement, appendChild, querySelector(All), classList, style, dataset, events.
const fs = require('fs');
const page = fs.readFileSync(process.argv[2], 'utf8');
const data = page.match(/<script type="application\/json" id="qkv-data">([\s\S]*?)<\/script>/)[1];
const js = page.match(/<script>([\s\S]*?)<\/script>/)[1];
function el(tag) {
  const e = {tag, children: [], style: {}, dataset: {}, _html: '', _text: '', className: '', value: '',
    set textContent(v){ this._text = v; if (v === '') this.children = []; }, get textContent(){ return this._text; },
    classList: {s: new Set(), add(c){this.s.add(c);}, remove(c){this.s.delete(c);}},
    appendChild(c){this.children.push(c); return c;},
    querySelector(){ return {remove(){}}; },
    querySelectorAll(){ return []; },
    set innerHTML(v){ this._html = v; this.children = []; }, get innerHTML(){ return this._html; },
  };
  return e;
}
const ids = {};
global.document = {
  getElementById(id){ if (id === 'qkv-data') return {textContent: data}; return ids[id] || (ids[id] = el('div')); },
  createElement: el, createTextNode: t => ({text: t}),
};
global.atob = s => Buffer.from(s, 'base64').toString('binary');
eval(js);
const firstGrid = ids['grid'].innerHTML;  // as the page opens, before the clicks below
const text = ids['text'];
if (text.children.length < 3) throw new Error('no tokens drawn');
if (!ids['keys'].innerHTML.includes('<table>')) throw new Error('no key table');
if (!ids['grid'].innerHTML.includes('<table>')) throw new Error('no grid');
// exercise the controls
ids['qty'].onchange({target: {value: 'contribution'}});
ids['head'].onchange({target: {value: String(JSON.parse(data).heads[0][1])}});  // a head the record holds
ids['layer'].onchange({target: {value: String(JSON.parse(data).layers.slice(-1)[0][0])}});
ids['qty'].onchange({target: {value: 'rollout'}});
text.children.filter(c => c.onclick)[1].onclick();
console.log('ok', text.children.length, ids['keys'].innerHTML.length, ids['grid'].innerHTML.length);
// with a third argument "tables": print each head's key table (and each propagation's) as JSON
if (process.argv[3] === 'tables') {
  const D = JSON.parse(data), out = {heads: {}, prop: {}};
  out.text = ids['text'].children.map(c => c.text !== undefined ? ['', c.text] : [c.className, c.textContent]);
  ids['qty'].onchange({target: {value: 'weight'}});
  for (const h of D.heads) {
    ids['layer'].onchange({target: {value: String(h[0])}});
    ids['head'].onchange({target: {value: String(h[1])}});
    out.heads[`${h[0]}.${h[1]}`] = ids['keys'].innerHTML;
  }
  for (const k in D.prop) { ids['qty'].onchange({target: {value: k}}); out.prop[k] = ids['keys'].innerHTML; }
  console.log(JSON.stringify(out));
}
// with a third argument "neuron": print the neuron section's HTML as JSON
if (process.argv[3] === 'neuron') console.log(JSON.stringify({display: ids['neuron'].style.display || '', html: ids['neuron'].innerHTML}));
// with a third argument "grid": print the grid as the page first drew it, as JSON
if (process.argv[3] === 'grid') console.log(JSON.stringify({grid: firstGrid}));
