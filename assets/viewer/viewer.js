// The kept-vs-dropped picture, drawn on a canvas from `props.value` (the kept set, merge groups and
// scores, sent on every change) and the scene of its image (the photo, where every visual token sits,
// and the picture's look, `style`: explorer/views/style.py, the PIL pictures' own), which it asks the
// server for once per image, `server.scene(key)`: see explorer/views/viewer.py.
// Gradio's gr.HTML runs this once, with `element`, `props`, `server` and `watch`. What the picture shows
// lives in `state`; the drawing functions take what they draw as arguments, and the event handlers
// change `state` and draw again.
const $ = (selector) => element.querySelector(selector);
const page = {
  view: $('.tdx-view'), canvas: $('.tdx-canvas'), count: $('.tdx-count'), tip: $('.tdx-tip'), note: $('.tdx-note'),
  banner: $('.tdx-banner'), empty: $('.tdx-empty'), views: $('.tdx-views'), legend: $('.tdx-legend'),
  scale: $('.tdx-scale'), low: $('.tdx-low'), high: $('.tdx-high'),
};
const ctx = page.canvas.getContext('2d');
const fit = () => ({k: 1, x: 0, y: 0});
const state = {
  scene: null,  // the decoded scene of the value's image
  value: null,  // the decoded value, on that scene
  view: 0,  // which of the scene's views is shown
  mode: 'kept',  // kept / dropped, or 'scores'
  zoom: fit(),  // the canvas scaled by k and moved by (x, y) view pixels
  draws: 0,  // pictures drawn (tests wait on it)
  asked: null,  // the key whose scene the server was asked for
  pointers: new Map(),  // pointer id -> [x, y], while down
  pinch: null,  // the distance between two fingers, while pinching
};

const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const typed = (b64, T) => (b64 ? new T(bytes(b64).buffer) : null);
const rgb = (c) => `rgb(${[...c].join(',')})`;

function load(key) {  // ask the server for the scene of the value's image, once
  if (state.asked === key) return;
  state.asked = key;
  server.scene(key).then((s) => {
    if (!s) state.asked = null;  // not known (any more): ask again on the next change
    else if (s.key === state.asked) {
      state.scene = decode(s, ctx, draw);
      state.zoom = fit();
      legend(s.style);
      place();
    }
  });
}

function decode(s, ctx, ready) {  // the scene's arrays and pictures, decoded; `ready` is called when its photo is
  const d = {key: s.key, n: s.n, names: s.names, width: s.width, height: s.height, style: s.style, ready: false,
    partition: typed(s.partition, Uint16Array), cells: typed(s.cells, Uint16Array), boxes: typed(s.boxes, Int16Array),
    pixels: typed(s.pixels, Int32Array), palette: bytes(s.style.palette)};
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
    const {dim, luma, underlay: [base, slope]} = s.style;
    d.grey = recoloured(d.photo, luma, (l) => l * dim);  // dropped patches
    d.lift = recoloured(d.photo, luma, (l) => base + slope * l);  // under the score colours
    d.pattern = ctx.createPattern(hatch(s.style.hatch), 'repeat');
    d.ready = true;
    ready();
  };
  d.photo.src = s.photo;
  return d;
}

function key3(p, r, c) { return (p * 65536 + r) * 65536 + c; }

function recoloured(photo, luma, f) {  // the photo in grey, each pixel's brightness l (0..255) mapped by f
  const c = document.createElement('canvas');
  c.width = photo.naturalWidth; c.height = photo.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(photo, 0, 0);
  const img = g.getImageData(0, 0, c.width, c.height), px = img.data;
  for (let i = 0; i < px.length; i += 4) {
    const l = f(luma[0] * px[i] + luma[1] * px[i + 1] + luma[2] * px[i + 2]);
    px[i] = px[i + 1] = px[i + 2] = l;
  }
  g.putImageData(img, 0, 0);
  return c;
}

function hatch({colour, every, width}) {  // one tile of the diagonal lines across dropped patches
  const c = document.createElement('canvas');
  c.width = c.height = every;
  const g = c.getContext('2d');
  g.fillStyle = rgb(colour);
  for (let y = 0; y < every; y++) for (let x = 0; x < every; x++) if ((x + y) % every < width) g.fillRect(x, y, 1, 1);
  return c;
}

function legend(style) {  // the picture's key, each look's swatch and words, before the colour scale
  page.legend.replaceChildren(...style.legend.map(({words, swatch}) => {
    const item = document.createElement('span'), sample = document.createElement('i');
    sample.style.cssText = swatch;
    item.append(sample, words);
    return item;
  }), page.scale);
  page.scale.querySelector('.bar').style.background = style.scale;
}

function decoded(v, scene) {  // the value's arrays, on its own scene only
  if (!v || !scene || v.key !== scene.key || v.n !== scene.n) return null;
  const bits = bytes(v.keep), keep = new Uint8Array(v.n);
  for (let i = 0; i < v.n; i++) keep[i] = (bits[i >> 3] >> (i & 7)) & 1;
  const groups = typed(v.groups, Int32Array), scores = typed(v.scores, Float32Array);
  const colour = new Map();  // merge target -> its colour: the palette's, in the targets' order, as visual.overlay
  const palette = v.palette ? bytes(v.palette) : scene.palette;  // a clip's frame: its groups' colours in the clip
  if (groups) [...new Set(groups.filter((g) => g >= 0))].sort((a, b) => a - b)
    .forEach((t, i) => colour.set(t, rgb(palette.subarray(3 * i, 3 * i + 3))));
  return {keep, groups, scores, colour, pending: v.pending, text: v.text, note: v.note};
}

function box(scene, vw, t) {  // token t's box on the canvas of view vw, and where it is on the photo
  const b = scene.boxes, [ox, oy] = vw.offset.get(scene.partition[t]);
  const x = b[4 * t], y = b[4 * t + 1], w = b[4 * t + 2] - x, h = b[4 * t + 3] - y;
  return {x, y, w, h, dx: x + ox, dy: y + oy};
}

function picture(ctx, scene, value, vw, mode) {  // the whole canvas; returns the [low, high] scores it shows, if any
  ctx.clearRect(0, 0, vw.width, vw.height);
  for (const p of vw.panels) {
    const [x0, y0, x1, y1] = p.src;
    ctx.drawImage(scene.photo, x0, y0, x1 - x0, y1 - y0, p.dst[0], p.dst[1], x1 - x0, y1 - y0);
  }
  let range = null;
  if (value && !value.pending) {
    if (mode === 'scores' && value.scores) range = drawScores(ctx, scene, value, vw);
    else drawKept(ctx, scene, value, vw);
  }
  labels(ctx, scene, value, vw);
  return range;
}

function drawKept(ctx, scene, value, vw) {  // as visual.overlay: dropped grey and hatched, merged tinted, kept outlined
  const style = scene.style, kept = rgb(style.kept), lines = Math.max(1, Math.round(scene.width / 600));
  for (const t of vw.tokens) {
    if (value.keep[t]) continue;
    const q = box(scene, vw, t), g = value.groups ? value.groups[t] : -1;
    ctx.drawImage(scene.grey, q.x, q.y, q.w, q.h, q.dx, q.dy, q.w, q.h);
    if (g >= 0) {
      ctx.globalAlpha = style.tint; ctx.fillStyle = value.colour.get(g) || kept;
      ctx.fillRect(q.dx, q.dy, q.w, q.h); ctx.globalAlpha = 1;
    } else {
      ctx.fillStyle = scene.pattern; ctx.fillRect(q.dx, q.dy, q.w, q.h);
    }
    for (let i = 0; i < 4; i++) {  // the line of a kept neighbour, on this dropped patch's side
      const u = scene.near[4 * t + i];
      if (u < 0 || !value.keep[u]) continue;
      ctx.fillStyle = (value.groups && value.colour.get(u)) || kept;
      if (i === 0) ctx.fillRect(q.dx, q.dy, q.w, lines);
      if (i === 1) ctx.fillRect(q.dx, q.dy + q.h - lines, q.w, lines);
      if (i === 2) ctx.fillRect(q.dx, q.dy, lines, q.h);
      if (i === 3) ctx.fillRect(q.dx + q.w - lines, q.dy, lines, q.h);
    }
  }
}

function inferno(stops, f) {  // the colour of f in [0, 1] along the stops, as visual.colours
  const x = Math.min(1, Math.max(0, f)) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), r = x - i;
  return rgb(stops[i].map((a, j) => Math.round(a * (1 - r) + stops[i + 1][j] * r)));
}

function drawScores(ctx, scene, value, vw) {  // colour by rank among the view's scored tokens, as visual.heatmap
  const style = scene.style, s = value.scores;
  const scored = [...vw.tokens].filter((t) => Number.isFinite(s[t])).sort((a, b) => s[a] - s[b] || a - b);
  scored.forEach((t, i) => {
    const q = box(scene, vw, t);
    ctx.drawImage(scene.lift, q.x, q.y, q.w, q.h, q.dx, q.dy, q.w, q.h);
    ctx.globalAlpha = 1 - style.heat_under; ctx.fillStyle = inferno(style.inferno, scored.length > 1 ? i / (scored.length - 1) : 1);
    ctx.fillRect(q.dx, q.dy, q.w, q.h); ctx.globalAlpha = 1;
  });
  return scored.length ? [s[scored[0]], s[scored[scored.length - 1]]] : [NaN, NaN];
}

function labels(ctx, scene, value, vw) {  // each panel outlined, and labelled in the band above it with what it kept
  const font = Math.round(vw.band * 0.62);
  ctx.font = `600 ${font}px sans-serif`; ctx.textBaseline = 'middle';
  for (const p of vw.panels) {
    const [x0, y0, x1, y1] = p.src, [dx, dy] = p.dst;
    let text = p.label;
    if (value && !value.pending) {
      const mine = [...vw.tokens].filter((t) => scene.partition[t] === p.partition);
      text += `: ${mine.filter((t) => value.keep[t]).length} of ${mine.length} kept`;
    }
    ctx.fillStyle = rgb(scene.style.label); ctx.fillText(text, dx + 2, dy - vw.band / 2, Math.max(20, x1 - x0 - 4));
    ctx.strokeStyle = rgb(scene.style.frame); ctx.lineWidth = 1; ctx.strokeRect(dx - 1.5, dy - 1.5, x1 - x0 + 3, y1 - y0 + 3);
  }
}

function draw() {  // the picture and the texts around it, for props.value and the state
  const v = props.value;
  page.empty.hidden = !!(v && v.key);
  if (!v || !v.key) {
    state.scene = state.value = state.asked = null;
    page.count.textContent = ''; page.note.textContent = ''; page.canvas.width = 0;
    return;
  }
  if (!state.scene || state.scene.key !== v.key) { load(v.key); return; }  // drawn when its scene has come
  const scene = state.scene;
  if (!scene.ready) return;
  state.view = Math.min(state.view, scene.views.length - 1);
  state.value = decoded(v, scene);
  const vw = scene.views[state.view], value = state.value;
  if (page.canvas.width !== vw.width || page.canvas.height !== vw.height) {
    page.canvas.width = vw.width; page.canvas.height = vw.height;
  }
  const range = picture(ctx, scene, value, vw, state.mode);
  if (range) {
    page.low.textContent = `low ${range[0].toPrecision(3)}`;
    page.high.textContent = `high ${range[1].toPrecision(3)}`;
  }
  page.scale.hidden = !(state.mode === 'scores' && value && value.scores);
  page.count.textContent = value ? value.text : '';
  page.note.textContent = value && !value.pending ? value.note : '';  // a pending note is on the picture
  page.banner.hidden = !(value && value.pending);
  page.banner.textContent = value && value.pending ? value.note : '';
  buttons(scene, state.view, state.mode);
  element.dataset.draws = ++state.draws;  // tests wait on this
  element.dataset.view = vw.name;
}

function buttons(scene, view, mode) {  // one button per view, and which view and mode are on
  const names = scene.views.map((v) => v.name).join('|');
  if (page.views.dataset.names !== names) {
    page.views.dataset.names = names;
    page.views.replaceChildren(...scene.views.map((v, i) => {
      const b = document.createElement('button');
      b.type = 'button'; b.textContent = v.name;
      b.onclick = () => { state.view = i; state.zoom = fit(); page.tip.textContent = ''; place(); draw(); };
      return b;
    }));
  }
  [...page.views.children].forEach((b, i) => b.setAttribute('aria-pressed', String(i === view)));
  element.querySelectorAll('.tdx-modes button').forEach((b) => b.setAttribute('aria-pressed', String(b.dataset.mode === mode)));
}
element.querySelectorAll('.tdx-modes button').forEach((b) => { b.onclick = () => { state.mode = b.dataset.mode; draw(); }; });

function place() {  // the canvas where state.zoom puts it
  const {k, x, y} = state.zoom;
  page.canvas.style.transform = `translate(${x}px, ${y}px) scale(${k})`;
  element.dataset.zoom = k.toFixed(3);
  page.view.style.touchAction = k > 1 ? 'none' : 'pan-y';  // unzoomed, a finger on the picture still scrolls the page
  page.view.style.cursor = k > 1 ? 'grab' : 'crosshair';
}
function zoomed(z, factor, cx, cy) {  // z zoomed by factor, keeping the point under (cx, cy), in view pixels, where it is
  const k = Math.min(16, Math.max(1, z.k * factor));
  return k === 1 ? fit() : {k, x: cx - (cx - z.x) * k / z.k, y: cy - (cy - z.y) * k / z.k};
}
const zoomAt = (factor, cx, cy) => { state.zoom = zoomed(state.zoom, factor, cx, cy); place(); };
const refit = () => { state.zoom = fit(); place(); };
const middle = () => [page.view.clientWidth / 2, page.view.clientHeight / 2];
page.view.addEventListener('wheel', (e) => {
  e.preventDefault();
  const r = page.view.getBoundingClientRect();
  zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
}, {passive: false});
page.view.addEventListener('keydown', (e) => {
  const step = 40, moves = {ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step]}, z = state.zoom;
  if (e.key === '+' || e.key === '=') zoomAt(1.25, ...middle());
  else if (e.key === '-') zoomAt(0.8, ...middle());
  else if (e.key === '0') refit();
  else if (moves[e.key] && z.k > 1) { state.zoom = {k: z.k, x: z.x + moves[e.key][0], y: z.y + moves[e.key][1]}; place(); }
  else return;
  e.preventDefault();
});
page.view.addEventListener('pointerdown', (e) => {
  page.view.setPointerCapture(e.pointerId);
  state.pointers.set(e.pointerId, [e.clientX, e.clientY]);
  hover(e);  // a tap tells the patch too
});
const lift = (e) => { state.pointers.delete(e.pointerId); state.pinch = null; };
page.view.addEventListener('pointerup', lift);
page.view.addEventListener('pointercancel', lift);
page.view.addEventListener('pointermove', (e) => {
  const last = state.pointers.get(e.pointerId), z = state.zoom;
  if (last && state.pointers.size === 1 && z.k > 1) {
    state.zoom = {k: z.k, x: z.x + e.clientX - last[0], y: z.y + e.clientY - last[1]}; place();
  }
  if (last) state.pointers.set(e.pointerId, [e.clientX, e.clientY]);
  if (state.pointers.size === 2) {
    const [a, b] = [...state.pointers.values()], d = Math.hypot(a[0] - b[0], a[1] - b[1]), r = page.view.getBoundingClientRect();
    if (state.pinch) zoomAt(d / state.pinch, (a[0] + b[0]) / 2 - r.left, (a[1] + b[1]) / 2 - r.top);
    state.pinch = d;
  }
  hover(e);
});
page.view.addEventListener('dblclick', refit);
$('.tdx-in').onclick = () => zoomAt(1.5, ...middle());
$('.tdx-out').onclick = () => zoomAt(1 / 1.5, ...middle());
$('.tdx-fit').onclick = refit;

function hover(e) {  // tell the token under the pointer
  const scene = state.scene;
  if (!scene || !scene.ready) return;
  const r = page.canvas.getBoundingClientRect();
  const x = (e.clientX - r.left) / r.width * page.canvas.width, y = (e.clientY - r.top) / r.height * page.canvas.height;
  const t = tokenAt(scene, scene.views[state.view], x, y);
  page.tip.textContent = t === null ? 'No visual token there.' : describe(scene, state.value, t);
}

function tokenAt(scene, vw, x, y) {  // the token of view vw at canvas pixel (x, y), or null
  for (const t of vw.tokens) {
    const q = box(scene, vw, t);
    if (q.dx <= x && x < q.dx + q.w && q.dy <= y && y < q.dy + q.h) return t;
  }
  return null;
}

function describe(scene, value, t) {  // one line on token t, word for word as visual.describe
  const [x0, y0, x1, y1] = scene.pixels.subarray(4 * t, 4 * t + 4), [row, col] = scene.cells.subarray(2 * t, 2 * t + 2);
  const where = `token ${t}: ${scene.names[scene.partition[t]]}, cell (row ${row}, col ${col}), pixels x ${x0}-${x1}, y ${y0}-${y1}`;
  if (!value) return where;
  const into = value.groups ? value.groups[t] : -1, score = value.scores ? value.scores[t] : NaN;
  const fate = value.pending ? 'chosen inside the LLM: Run to see' : value.keep[t] ? 'kept' : into >= 0 ? `merged into token ${into}` : 'dropped';
  return Number.isNaN(score) ? `${where}; ${fate}` : `${where}; score ${general(score, 4)}; ${fate}`;
}

function general(x, p) {  // Python's format(x, f'.{p}g'): p significant digits, ties to even, no trailing zeros
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'nan' : x > 0 ? 'inf' : '-inf';
  const sign = x < 0 || Object.is(x, -0) ? '-' : '';
  const [mantissa, power] = Math.abs(x).toExponential(100).split('e');  // exact, for any float32
  const all = mantissa.replace('.', ''), rest = all.slice(p), half = '5'.padEnd(rest.length, '0');
  let digits = Number(all.slice(0, p)), e = Number(power);
  if (rest > half || (rest === half && digits % 2 === 1)) digits += 1;
  if (digits === 10 ** p) { digits = 10 ** (p - 1); e += 1; }
  const s = String(digits).padStart(p, '0'), trim = (d) => d.replace(/0+$/, '');
  if (e < -4 || e >= p) {
    const frac = trim(s.slice(1));
    return `${sign}${s[0]}${frac ? '.' + frac : ''}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
  }
  const whole = e >= 0 ? s.slice(0, e + 1) : '0', frac = trim(e >= 0 ? s.slice(e + 1) : '0'.repeat(-e - 1) + s);
  return `${sign}${whole}${frac ? '.' + frac : ''}`;
}

watch('value', draw);
draw();
place();
