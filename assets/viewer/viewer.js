// The kept-vs-dropped picture, drawn on a canvas from `props.value` (the kept set, merge groups and
// scores, sent on every change) and the scene of its image (the photo and where every visual token
// sits), which it asks the server for once per image, `server.scene(key)`: see explorer/viewer.py.
// Gradio's gr.HTML runs this once, with `element`, `props`, `server` and `watch`. The style is
// explorer/visual.py's: dropped patches grey at `dim` of their brightness and hatched, merged ones
// tinted with their group's colour, a line on the dropped side of kept ones.
const $ = (selector) => element.querySelector(selector);
const view = $('.tdx-view'), canvas = $('.tdx-canvas'), ctx = canvas.getContext('2d');
const count = $('.tdx-count'), tip = $('.tdx-tip'), note = $('.tdx-note'), banner = $('.tdx-banner');
const empty = $('.tdx-empty'), scale = $('.tdx-scale');
const HATCH = 'rgb(190,190,190)', KEPT = 'rgb(255,212,0)';
const INFERNO = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
let S = null, V = null, current = 0, mode = 'kept', z = {k: 1, x: 0, y: 0}, draws = 0, asked = null;

const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const typed = (b64, T) => (b64 ? new T(bytes(b64).buffer) : null);

function load(key) {  // ask the server for the scene of the value's image, once
  if (asked === key) return;
  asked = key;
  server.scene(key).then((s) => {
    if (!s) asked = null;  // not known (any more): ask again on the next change
    else if (s.key === asked) { S = scene(s); z = {k: 1, x: 0, y: 0}; place(); }
  });
}

function scene(s) {  // the scene's arrays and pictures, decoded
  const d = {key: s.key, n: s.n, names: s.names, width: s.width, height: s.height, ready: false,
    partition: typed(s.partition, Uint16Array), cells: typed(s.cells, Uint16Array), boxes: typed(s.boxes, Int16Array)};
  d.views = s.views.map((v) => {
    const offset = new Map(v.panels.map((p) => [p.partition, [p.dst[0] - p.src[0], p.dst[1] - p.src[1]]]));
    return {...v, tokens: typed(v.tokens, Int32Array), offset};
  });
  const at = new Map();  // (partition, row, col) -> token, for each token's four neighbours
  for (let t = 0; t < d.n; t++) at.set(key3(d.partition[t], d.cells[2 * t], d.cells[2 * t + 1]), t);
  d.near = new Int32Array(4 * d.n).fill(-1);  // up, down, left, right
  for (let t = 0; t < d.n; t++) {
    const p = d.partition[t], r = d.cells[2 * t], c = d.cells[2 * t + 1];
    [[r - 1, c], [r + 1, c], [r, c - 1], [r, c + 1]].forEach(([rr, cc], i) => {
      const u = rr >= 0 && cc >= 0 ? at.get(key3(p, rr, cc)) : undefined;
      if (u !== undefined) d.near[4 * t + i] = u;
    });
  }
  d.photo = new Image();
  d.photo.onload = () => {
    d.grey = recoloured(d.photo, (l) => l * s.dim);  // dropped patches
    d.lift = recoloured(d.photo, (l) => 64 + 0.5 * l);  // under the score colours
    d.pattern = ctx.createPattern(hatch(s.hatch), 'repeat');
    d.ready = true;
    draw();
  };
  d.photo.src = s.photo;
  return d;
}

function key3(p, r, c) { return (p * 65536 + r) * 65536 + c; }

function recoloured(photo, f) {  // the photo in grey, each pixel's brightness l (0..255) mapped by f
  const c = document.createElement('canvas');
  c.width = photo.naturalWidth; c.height = photo.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(photo, 0, 0);
  const img = g.getImageData(0, 0, c.width, c.height), px = img.data;
  for (let i = 0; i < px.length; i += 4) {
    const l = f(0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2]);
    px[i] = px[i + 1] = px[i + 2] = l;
  }
  g.putImageData(img, 0, 0);
  return c;
}

function hatch(every) {  // one tile of the diagonal lines across dropped patches
  const c = document.createElement('canvas');
  c.width = c.height = every;
  const g = c.getContext('2d'), wide = Math.max(2, Math.floor(every / 3));
  g.fillStyle = HATCH;
  for (let y = 0; y < every; y++) for (let x = 0; x < every; x++) if ((x + y) % every < wide) g.fillRect(x, y, 1, 1);
  return c;
}

function decoded(v) {  // the value's arrays, for the current scene only
  if (!v || !S || v.key !== S.key || v.n !== S.n) return null;
  const bits = bytes(v.keep), keep = new Uint8Array(v.n);
  for (let i = 0; i < v.n; i++) keep[i] = (bits[i >> 3] >> (i & 7)) & 1;
  const groups = typed(v.groups, Int32Array), scores = typed(v.scores, Float32Array);
  const colour = new Map();  // merge target -> its colour, as visual.palette orders them
  if (groups) [...new Set(groups.filter((g) => g >= 0))].sort((a, b) => a - b)
    .forEach((t, i) => colour.set(t, `hsl(${((i * 0.618034) % 1) * 360} 100% 62.5%)`));
  return {keep, groups, scores, colour, pending: v.pending, text: v.text, note: v.note};
}

function box(vw, t) {  // token t's box on the canvas of view vw, and where it is on the photo
  const b = S.boxes, [ox, oy] = vw.offset.get(S.partition[t]);
  const x = b[4 * t], y = b[4 * t + 1], w = b[4 * t + 2] - x, h = b[4 * t + 3] - y;
  return {x, y, w, h, dx: x + ox, dy: y + oy};
}

function drawKept(vw) {
  const lines = Math.max(1, Math.round(S.width / 600));
  for (const t of vw.tokens) {
    if (V.keep[t]) continue;
    const q = box(vw, t), g = V.groups ? V.groups[t] : -1;
    ctx.drawImage(S.grey, q.x, q.y, q.w, q.h, q.dx, q.dy, q.w, q.h);
    if (g >= 0) {
      ctx.globalAlpha = 0.5; ctx.fillStyle = V.colour.get(g) || KEPT; ctx.fillRect(q.dx, q.dy, q.w, q.h); ctx.globalAlpha = 1;
    } else {
      ctx.fillStyle = S.pattern; ctx.fillRect(q.dx, q.dy, q.w, q.h);
    }
    for (let i = 0; i < 4; i++) {  // the line of a kept neighbour, on this dropped patch's side
      const u = S.near[4 * t + i];
      if (u < 0 || !V.keep[u]) continue;
      ctx.fillStyle = (V.groups && V.colour.get(u)) || KEPT;
      if (i === 0) ctx.fillRect(q.dx, q.dy, q.w, lines);
      if (i === 1) ctx.fillRect(q.dx, q.dy + q.h - lines, q.w, lines);
      if (i === 2) ctx.fillRect(q.dx, q.dy, lines, q.h);
      if (i === 3) ctx.fillRect(q.dx + q.w - lines, q.dy, lines, q.h);
    }
  }
}

function inferno(f) {
  const x = Math.min(1, Math.max(0, f)) * (INFERNO.length - 1), i = Math.min(Math.floor(x), INFERNO.length - 2), r = x - i;
  const [a, b] = [INFERNO[i], INFERNO[i + 1]];
  return `rgb(${a.map((v, j) => Math.round(v * (1 - r) + b[j] * r)).join(',')})`;
}

function drawScores(vw) {  // colour by rank among the view's scored tokens, as visual.heatmap does
  const scored = [...vw.tokens].filter((t) => Number.isFinite(V.scores[t])).sort((a, b) => V.scores[a] - V.scores[b] || a - b);
  scored.forEach((t, i) => {
    const q = box(vw, t);
    ctx.drawImage(S.lift, q.x, q.y, q.w, q.h, q.dx, q.dy, q.w, q.h);
    ctx.globalAlpha = 0.65; ctx.fillStyle = inferno(scored.length > 1 ? i / (scored.length - 1) : 1);
    ctx.fillRect(q.dx, q.dy, q.w, q.h); ctx.globalAlpha = 1;
  });
  const low = scored.length ? V.scores[scored[0]] : NaN, high = scored.length ? V.scores[scored[scored.length - 1]] : NaN;
  $('.tdx-low').textContent = `low ${low.toPrecision(3)}`;
  $('.tdx-high').textContent = `high ${high.toPrecision(3)}`;
}

function labels(vw) {  // each panel outlined, and labelled in the band above it with what it kept
  const font = Math.round(vw.band * 0.62);
  ctx.font = `600 ${font}px sans-serif`; ctx.textBaseline = 'middle';
  for (const p of vw.panels) {
    const [x0, y0, x1, y1] = p.src, [dx, dy] = p.dst;
    let text = p.label;
    if (V && !V.pending) {
      const mine = [...vw.tokens].filter((t) => S.partition[t] === p.partition);
      text += `: ${mine.filter((t) => V.keep[t]).length} of ${mine.length} kept`;
    }
    ctx.fillStyle = '#f2f2f2'; ctx.fillText(text, dx + 2, dy - vw.band / 2, Math.max(20, x1 - x0 - 4));
    ctx.strokeStyle = '#9aa0a6'; ctx.lineWidth = 1; ctx.strokeRect(dx - 1.5, dy - 1.5, x1 - x0 + 3, y1 - y0 + 3);
  }
}

function draw() {
  const v = props.value;
  empty.hidden = !!(v && v.key);
  if (!v || !v.key) { S = null; count.textContent = ''; note.textContent = ''; canvas.width = 0; return; }
  if (!S || S.key !== v.key) { load(v.key); return; }  // drawn when its scene has come
  if (!S.ready) return;
  current = Math.min(current, S.views.length - 1);
  const vw = S.views[current];
  if (canvas.width !== vw.width || canvas.height !== vw.height) { canvas.width = vw.width; canvas.height = vw.height; }
  ctx.fillStyle = '#1f2328'; ctx.fillRect(0, 0, vw.width, vw.height);
  for (const p of vw.panels) {
    const [x0, y0, x1, y1] = p.src;
    ctx.drawImage(S.photo, x0, y0, x1 - x0, y1 - y0, p.dst[0], p.dst[1], x1 - x0, y1 - y0);
  }
  V = decoded(props.value);
  const scores = mode === 'scores' && V && V.scores;
  if (V && !V.pending) (scores ? drawScores : drawKept)(vw);
  labels(vw);
  scale.hidden = !scores;
  count.textContent = V ? V.text : '';
  note.textContent = V && !V.pending ? V.note : '';  // a pending note is on the picture
  banner.hidden = !(V && V.pending);
  banner.textContent = V && V.pending ? V.note : '';
  buttons();
  element.dataset.draws = ++draws;  // tests wait on this
  element.dataset.view = vw.name;
}

function buttons() {  // one button per view, and which view and mode are on
  const box = $('.tdx-views');
  const names = S.views.map((v) => v.name).join('|');
  if (box.dataset.names !== names) {
    box.dataset.names = names;
    box.replaceChildren(...S.views.map((v, i) => {
      const b = document.createElement('button');
      b.type = 'button'; b.textContent = v.name;
      b.onclick = () => { current = i; z = {k: 1, x: 0, y: 0}; tip.textContent = ''; place(); draw(); };
      return b;
    }));
  }
  [...box.children].forEach((b, i) => b.setAttribute('aria-pressed', String(i === current)));
  element.querySelectorAll('.tdx-modes button').forEach((b) => b.setAttribute('aria-pressed', String(b.dataset.mode === mode)));
}
element.querySelectorAll('.tdx-modes button').forEach((b) => { b.onclick = () => { mode = b.dataset.mode; draw(); }; });

function place() {
  canvas.style.transform = `translate(${z.x}px, ${z.y}px) scale(${z.k})`;
  element.dataset.zoom = z.k.toFixed(3);
  view.style.touchAction = z.k > 1 ? 'none' : 'pan-y';  // unzoomed, a finger on the picture still scrolls the page
  view.style.cursor = z.k > 1 ? 'grab' : 'crosshair';
}
function zoomAt(factor, cx, cy) {  // keep the point under (cx, cy), in view pixels, where it is
  const k = Math.min(16, Math.max(1, z.k * factor));
  z.x = cx - (cx - z.x) * k / z.k; z.y = cy - (cy - z.y) * k / z.k; z.k = k;
  if (k === 1) z = {k: 1, x: 0, y: 0};
  place();
}
const middle = () => [view.clientWidth / 2, view.clientHeight / 2];
view.addEventListener('wheel', (e) => {
  e.preventDefault();
  const r = view.getBoundingClientRect();
  zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
}, {passive: false});
view.addEventListener('keydown', (e) => {
  const step = 40, moves = {ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step]};
  if (e.key === '+' || e.key === '=') zoomAt(1.25, ...middle());
  else if (e.key === '-') zoomAt(0.8, ...middle());
  else if (e.key === '0') { z = {k: 1, x: 0, y: 0}; place(); }
  else if (moves[e.key] && z.k > 1) { z.x += moves[e.key][0]; z.y += moves[e.key][1]; place(); }
  else return;
  e.preventDefault();
});
const pointers = new Map();
let pinch = null;
view.addEventListener('pointerdown', (e) => {
  view.setPointerCapture(e.pointerId);
  pointers.set(e.pointerId, [e.clientX, e.clientY]);
  hover(e);  // a tap tells the patch too
});
const lift = (e) => { pointers.delete(e.pointerId); pinch = null; };
view.addEventListener('pointerup', lift);
view.addEventListener('pointercancel', lift);
view.addEventListener('pointermove', (e) => {
  const last = pointers.get(e.pointerId);
  if (last && pointers.size === 1 && z.k > 1) { z.x += e.clientX - last[0]; z.y += e.clientY - last[1]; place(); }
  if (last) pointers.set(e.pointerId, [e.clientX, e.clientY]);
  if (pointers.size === 2) {
    const [a, b] = [...pointers.values()], d = Math.hypot(a[0] - b[0], a[1] - b[1]), r = view.getBoundingClientRect();
    if (pinch) zoomAt(d / pinch, (a[0] + b[0]) / 2 - r.left, (a[1] + b[1]) / 2 - r.top);
    pinch = d;
  }
  hover(e);
});
view.addEventListener('dblclick', () => { z = {k: 1, x: 0, y: 0}; place(); });
$('.tdx-in').onclick = () => zoomAt(1.5, ...middle());
$('.tdx-out').onclick = () => zoomAt(1 / 1.5, ...middle());
$('.tdx-fit').onclick = () => { z = {k: 1, x: 0, y: 0}; place(); };

function hover(e) {  // the token under the pointer, worded as visual.describe words it
  if (!S || !S.ready) return;
  const vw = S.views[current], r = canvas.getBoundingClientRect();
  const x = (e.clientX - r.left) / r.width * canvas.width, y = (e.clientY - r.top) / r.height * canvas.height;
  for (const t of vw.tokens) {
    const q = box(vw, t);
    if (q.dx <= x && x < q.dx + q.w && q.dy <= y && y < q.dy + q.h) {
      const g = V && V.groups ? V.groups[t] : -1, s = V && V.scores ? V.scores[t] : NaN;
      const fate = !V ? '' : V.pending ? 'chosen inside the LLM: Run to see' : V.keep[t] ? 'kept' : g >= 0 ? `merged into token ${g}` : 'dropped';
      const score = Number.isFinite(s) ? `; score ${s.toPrecision(4)}` : '';
      tip.textContent = `token ${t}: ${S.names[S.partition[t]]}, cell (row ${S.cells[2 * t]}, col ${S.cells[2 * t + 1]})${score}; ${fate}`;
      return;
    }
  }
  tip.textContent = 'No visual token there.';
}

watch('value', draw);
draw();
place();
