// sd-lora ui — the single page. Vanilla ES2020, no build step, no external URLs.
// Everything from the server is put into the page with textContent / DOM nodes,
// never innerHTML, so file names and captions cannot inject markup.
'use strict';

/* ════════════════════════════ helpers ════════════════════════════ */

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

// Attributes that must be set as DOM properties (setAttribute('value') only
// sets the default, not what the input shows once the user typed in it).
const PROPS = new Set(['value', 'checked', 'disabled', 'selected', 'hidden', 'open', 'textContent']);

/** Builds an element: el('button', {class: 'x', onclick: fn}, 'text', child). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (PROPS.has(k)) node[k] = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

class ApiError extends Error {
  constructor(message, key, status, field) {
    super(message);
    this.key = key || null;
    this.field = field || null; // the form field the server says the message belongs to
    this.status = status;
  }
}

/** The one way the page talks to the server. Throws ApiError with the server's message. */
async function api(method, url, body) {
  const opts = { method, credentials: 'same-origin', headers: {} };
  // The server refuses POSTs without a JSON content type (CSRF defence), so
  // every POST carries a JSON body, even an empty one.
  if (method !== 'GET') {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body === undefined ? {} : body);
  }
  let res;
  try {
    res = await fetch(url, opts);
  } catch (e) {
    throw new ApiError('Cannot reach the sd-lora server. Is `sd-lora ui` still running?', null, 0);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!res.ok) {
    const msg = (data && data.error) || `${res.status} ${res.statusText || 'error'}`.trim();
    throw new ApiError(msg, data && data.key, res.status, data && data.field);
  }
  return data;
}

const enc = encodeURIComponent;
const fileUrl = (p) => '/api/file?path=' + enc(p);
const thumbUrl = (p, size = 256) => `/api/thumb?path=${enc(p)}&size=${size}`;
const basename = (p) => String(p || '').split(/[\\/]/).filter(Boolean).pop() || String(p || '');
const dirname = (p) => { const m = /^(.*)[\\/][^\\/]+[\\/]?$/.exec(String(p || '')); return m ? (m[1] || '/') : ''; };
const stripExt = (p) => String(p).replace(/\.[^./\\]+$/, '');
const clone = (v) => (v === undefined ? undefined : JSON.parse(JSON.stringify(v)));

/** Shows messages in an error area (hidden when there are none). */
function showErrors(area, messages) {
  const list = (Array.isArray(messages) ? messages : [messages]).filter(Boolean);
  area.replaceChildren(...list.map((m) => el('div', {}, m)));
  area.hidden = list.length === 0;
}

/** Text with `code` spans (as the schema's doc comments write them). */
function richText(text) {
  return String(text || '').split('`').map((part, i) => (i % 2 ? el('code', {}, part) : part));
}

/** Splits a description into its first sentence and the rest. */
function splitHelp(text) {
  const t = String(text || '').replace(/\s+/g, ' ').trim();
  const re = /[.!?:]\s+(?=[A-Z])/g;
  let m;
  while ((m = re.exec(t))) {
    const head = t.slice(0, m.index + 1);
    // Do not cut inside parentheses, code spans or after "e.g.".
    const balanced = count(head, '(') === count(head, ')') && count(head, '`') % 2 === 0;
    if (balanced && !/\b(e\.g|i\.e|etc|vs)\.$/.test(head) && head.length > 15) {
      return [head, t.slice(m.index + m[0].length)];
    }
  }
  return [t, ''];
}
const count = (s, ch) => s.split(ch).length - 1;

function fmtNum(x) {
  if (!Number.isFinite(x)) return '—';
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return String(Number(x.toPrecision(4)));
}

function fmtDuration(s) {
  if (!Number.isFinite(s) || s < 0) return '';
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function fmtBytes(n) {
  if (!Number.isFinite(n)) return String(n);
  const units = ['bytes', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** Disables a button while an action runs, and always gives it back. */
async function busy(btn, fn) {
  btn.disabled = true;
  btn.classList.add('busy');
  try {
    return await fn();
  } finally {
    btn.classList.remove('busy');
    btn.disabled = false;
    renderJobNow(); // job-dependent buttons (start, generate) get their real state back
  }
}

function storeGet(key, fallback) {
  try { const v = localStorage.getItem('sdlora.' + key); return v === null ? fallback : JSON.parse(v); } catch (e) { return fallback; }
}
function storeSet(key, value) {
  try { localStorage.setItem('sdlora.' + key, JSON.stringify(value)); } catch (e) { /* private mode: fine */ }
}

/* ════════════════════════════ state ════════════════════════════ */

const state = {
  info: null,
  config: storeGet('config', {}),  // only the keys the user set
  undoConfig: null,
  fields: new Map(),                // 'train.steps' -> field
  localErrors: {},                  // key -> message (unparsable input, not sent)
  serverErrors: [],                 // from /api/config/check or a refused start
  actionError: '',                  // a failed load/save/start
  dataset: null,                    // {path, data}
  lastLora: storeGet('lastLora', null),
  galleryLoaded: false,
  genModelTouched: false,
};

/* ════════════════════════════ views ════════════════════════════ */

const VIEWS = ['dataset', 'train', 'generate', 'lora'];

function showView(name) {
  if (!VIEWS.includes(name)) name = 'dataset';
  for (const v of VIEWS) $('#view-' + v).hidden = v !== name;
  for (const t of $$('.tab')) {
    t.classList.toggle('active', t.dataset.view === name);
    t.setAttribute('aria-current', t.dataset.view === name ? 'page' : 'false');
  }
  history.replaceState(null, '', location.pathname + location.search + '#' + name);
  if (name === 'train') drawChartSoon(); // the canvas has no size while hidden
  if (name === 'generate') {
    defaultGenModel();
    if (!state.galleryLoaded) loadGallery();
  }
}

/* ════════════════════════════ folder / file picker ════════════════════════════ */

const picker = { resolve: null, mode: 'dir', path: null, parent: null };

/** Opens the picker; resolves with the chosen path, or null when cancelled. */
function pick({ mode = 'dir', start = '', title } = {}) {
  const dlg = $('#picker');
  if (picker.resolve) picker.resolve(null);
  return new Promise((resolve) => {
    picker.resolve = resolve;
    picker.mode = mode;
    $('#picker-title').textContent = title || (mode === 'dir' ? 'Choose a folder' : 'Choose a file');
    $('#picker-choose').hidden = mode === 'file';
    $('#picker-hint').textContent = mode === 'dir' ? 'Open a folder, then press Choose.'
      : mode === 'file' ? 'Click a file to choose it.' : 'Click a file, or open a folder and press Choose.';
    if (!dlg.open) dlg.showModal();
    // Nothing typed yet: start in the working folder, where relative paths start.
    browseTo(start || (state.info && state.info.cwd) || '', true);
  });
}

function finishPick(path) {
  const resolve = picker.resolve;
  picker.resolve = null;
  if ($('#picker').open) $('#picker').close();
  if (resolve) resolve(path);
}

let browseSeq = 0;
async function browseTo(path, fallBack) {
  const mine = ++browseSeq; // a quick second click must not be overwritten by the first answer
  const list = $('#picker-list');
  list.replaceChildren(el('li', { class: 'muted' }, 'Loading…'));
  $('#picker-error').hidden = true;
  try {
    const r = await api('GET', '/api/fs?path=' + enc(path || ''));
    if (mine === browseSeq) renderPicker(r);
  } catch (e) {
    if (mine !== browseSeq) return;
    // A start value may be a file, a new name or a stale path: walk up to
    // something that exists rather than greeting the user with an error.
    if (fallBack && path) return browseTo(dirname(path), true);
    list.replaceChildren();
    showErrors($('#picker-error'), e.message);
  }
}

function renderPicker(r) {
  picker.path = r.path;
  picker.parent = r.parent;
  $('#picker-path').textContent = r.path || 'Places you can use';
  $('#picker-up').disabled = !r.path;
  $('#picker-choose').disabled = !r.path;
  const entries = r.entries || [];
  const items = entries.map((e) => {
    const choosable = e.dir || picker.mode !== 'dir';
    return el('li', {}, el('button', {
      type: 'button',
      class: 'picker-entry' + (e.dir ? ' dir' : ' file') + (choosable ? '' : ' dim'),
      dataset: { path: e.path, dir: e.dir ? '1' : '0' },
      title: e.path,
      onclick: () => (e.dir ? browseTo(e.path) : choosable && finishPick(e.path)),
    }, el('span', { class: 'icon' }, e.dir ? '📁' : '📄'), el('span', { class: 'name' }, e.name),
    e.dir ? null : el('span', { class: 'size muted' }, fmtBytes(e.size))));
  });
  if (!items.length) items.push(el('li', { class: 'empty' }, 'This folder is empty.'));
  $('#picker-list').replaceChildren(...items);
}

function wirePicker() {
  const dlg = $('#picker');
  $('#picker-cancel').addEventListener('click', () => finishPick(null));
  $('#picker-up').addEventListener('click', () => browseTo(picker.parent || ''));
  $('#picker-choose').addEventListener('click', () => picker.path && finishPick(picker.path));
  dlg.addEventListener('close', () => finishPick(null)); // Escape key
}

/** Lets the user pick a path into `input`; an input event tells the input's listeners. */
async function pickInto(input, mode, title) {
  const p = await pick({ mode, start: input.value.trim(), title });
  if (p === null) return;
  input.value = p;
  input.dispatchEvent(new Event('input', { bubbles: true }));
}

function browseButton(input, mode, title) {
  return el('button', { type: 'button', class: 'browse', onclick: () => pickInto(input, mode, title) }, 'Browse…');
}

function wireBrowse(buttonSel, inputSel, mode, title) {
  $(buttonSel).addEventListener('click', () => pickInto($(inputSel), mode, title));
}

/* ════════════════════════════ dataset view ════════════════════════════ */

const CAPTION_SOURCES = {
  file: 'caption file',
  folder: 'from the folder name',
  prompt: 'from the subset caption',
  none: 'no caption',
};

async function loadDataset() {
  const path = $('#ds-path').value.trim();
  if (!path) {
    showErrors($('#ds-error'), 'Choose the folder with your training images first.');
    return;
  }
  const q = new URLSearchParams({ path });
  const res = getConfig('dataset.resolution');
  if (res) q.set('resolution', res); // so the buckets shown are the ones training will use
  const extra = datasetExtras();
  for (const [k, v] of Object.entries(extra)) if (v) q.set(k, v);
  showErrors($('#ds-error'), []);
  $('#ds-empty').hidden = true;
  $('#ds-grid').replaceChildren(el('p', { class: 'loading' }, 'Reading the images…'));
  await busy($('#ds-load'), async () => {
    try {
      const data = await api('GET', '/api/dataset?' + q);
      state.dataset = { path, data, extra };
      storeSet('dsPath', path);
      renderDataset(data);
    } catch (e) {
      state.dataset = null;
      $('#ds-grid').replaceChildren();
      for (const id of ['#ds-summary', '#ds-advice', '#ds-buckets', '#ds-problems']) $(id).hidden = true;
      showErrors($('#ds-error'), e.message);
    }
  });
}

function renderDataset(d) {
  const s = d.summary || {};
  const stat = (n, label, cls) => el('div', { class: 'stat ' + (cls || '') }, el('strong', {}, String(n ?? '—')), el('span', {}, label));
  $('#ds-summary').replaceChildren(
    el('div', { class: 'stats' },
      stat(s.images, 'images'),
      stat(s.samples_per_epoch, 'samples per epoch'),
      stat(s.errors, 'errors', s.errors ? 'bad' : 'good'),
      stat(s.warnings, 'warnings', s.warnings ? 'warn' : 'good')),
    ...(d.subsets || []).map(renderSubsetSummary));
  $('#ds-summary').hidden = false;
  renderAdvice(d.advice);
  renderBuckets(d.buckets || []);
  renderProblems(d.problems || []);
  renderGrid(d.images || [], d.problems || []);
}

function renderSubsetSummary(sub) {
  const caps = Object.entries(sub.caption_files || {}).map(([ext, n]) => `${n} ${ext} file${n === 1 ? '' : 's'}`);
  const parts = [
    `${sub.images} image${sub.images === 1 ? '' : 's'}`,
    `seen ${sub.repeats}× per epoch`,
    caps.length ? `captions: ${caps.join(', ')}` : 'no caption files',
  ];
  if (sub.fallback_caption) parts.push(`others use “${sub.fallback_caption}”`);
  if (sub.uncaptioned) parts.push(`${sub.uncaptioned} without any caption`);
  if (sub.masks) parts.push(`${sub.masks} masks`);
  return el('div', { class: 'subset-summary' },
    el('span', { class: 'badge ' + sub.kind }, sub.kind), ' ',
    el('code', {}, sub.path), el('div', { class: 'muted' }, parts.join(' · ')));
}

function renderAdvice(advice) {
  const box = $('#ds-advice');
  const items = (advice || []).map((a) => el('div', { class: 'advice' },
    el('strong', {}, `Trigger word “${a.word}”`), a.prompt ? el('span', { class: 'muted' }, ` in “${a.prompt}”`) : null,
    el('div', {}, a.problem),
    a.suggestions && a.suggestions.length ? el('div', {}, 'Safer choices: ', a.suggestions.map((w) => el('code', { class: 'chip' }, w))) : null));
  // A small checker, so a trigger word can be tried before renaming folders.
  const input = el('input', { id: 'ds-identifier', type: 'text', placeholder: 'e.g. ohwx robot' });
  const out = el('div', { class: 'muted' });
  const check = el('button', {
    type: 'button', class: 'small',
    onclick: () => busy(check, async () => {
      out.replaceChildren('Checking…');
      try {
        const r = await api('GET', '/api/identifier?prompt=' + enc(input.value));
        const adv = r.advice || [];
        out.replaceChildren(...(adv.length ? adv.map((a) => el('div', {}, el('b', {}, `“${a.word}”: `), a.problem,
          a.suggestions && a.suggestions.length ? ` Try: ${a.suggestions.join(', ')}` : '')) : ['No problems with that trigger word.']));
      } catch (e) { out.replaceChildren(el('span', { class: 'error-text' }, e.message)); }
    }),
  }, 'Check');
  box.replaceChildren(el('div', { class: 'card-title' }, 'Trigger words'),
    ...(items.length ? items : [el('p', { class: 'muted' }, 'No problems found with the trigger words of this dataset.')]),
    el('div', { class: 'inline-form' }, el('label', { for: 'ds-identifier' }, 'Try a trigger word:'), input, check), out);
  box.hidden = false;
}

function renderBuckets(buckets) {
  const box = $('#ds-buckets');
  const max = Math.max(1, ...buckets.map((b) => b.images));
  box.replaceChildren(el('div', { class: 'card-title' }, 'Image shapes (buckets)'),
    el('p', { class: 'help' }, 'Samples per epoch trained at each size.'),
    ...buckets.map((b) => el('div', { class: 'bucket' },
      el('span', { class: 'bucket-label' }, `${b.bucket[0]}×${b.bucket[1]}`),
      el('span', { class: 'bar' }, el('span', { style: `width:${(100 * b.images / max).toFixed(1)}%` })),
      el('span', { class: 'bucket-count' }, String(b.images)))));
  box.hidden = false;
}

function renderProblems(problems) {
  const box = $('#ds-problems');
  const sorted = problems.slice().sort((a, b) => (a.severity === 'error' ? 0 : 1) - (b.severity === 'error' ? 0 : 1));
  box.replaceChildren(el('div', { class: 'card-title' }, `Problems (${problems.length})`),
    sorted.length
      ? el('ul', { class: 'problems' }, sorted.map((p) => el('li', { class: p.severity },
        el('span', { class: 'badge ' + p.severity }, p.severity), ' ', el('b', { title: p.path }, basename(p.path)), ': ', p.message)))
      : el('p', { class: 'good' }, 'No problems found ✓'));
  box.hidden = false;
}

function renderGrid(images, problems) {
  const byPath = new Map();
  for (const p of problems) {
    if (!byPath.has(p.path)) byPath.set(p.path, []);
    byPath.get(p.path).push(p);
  }
  const cards = images.map((img) => thumbCard(img, byPath.get(img.path) || []));
  $('#ds-grid').replaceChildren(...(cards.length ? cards : [el('p', { class: 'empty' }, 'No images found in this folder.')]));
}

function thumbCard(img, problems) {
  const caption = el('textarea', { class: 'caption', rows: 3, value: img.caption || '', placeholder: 'No caption yet: describe the image', spellcheck: 'true' });
  const mark = el('span', { class: 'save-mark' });
  const source = el('span', { class: 'caption-source', title: 'where this caption comes from' }, CAPTION_SOURCES[img.caption_source] || img.caption_source || '');
  let saved = caption.value;
  const setMark = (st, text) => { mark.dataset.state = st; mark.textContent = text; };
  const save = async () => {
    if (caption.value === saved) return;
    const text = caption.value;
    setMark('saving', 'saving…');
    try {
      await api('POST', '/api/caption', { image: img.path, text });
      saved = text;
      setMark('saved', 'saved ✓');
      source.textContent = CAPTION_SOURCES.file;
    } catch (e) {
      setMark('failed', 'not saved: ' + e.message);
    }
  };
  caption.addEventListener('blur', save);
  caption.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); save(); }
  });
  caption.addEventListener('input', () => setMark(caption.value === saved ? '' : 'dirty', caption.value === saved ? '' : 'unsaved'));
  const worst = problems.some((p) => p.severity === 'error') ? 'error' : problems.length ? 'warning' : '';
  return el('div', { class: 'thumb' + (worst ? ' has-problem ' + worst : ''), dataset: { path: img.path } },
    el('a', { href: fileUrl(img.path), target: '_blank', rel: 'noopener', class: 'thumb-img' },
      el('img', { src: thumbUrl(img.path), alt: basename(img.path), loading: 'lazy' })),
    el('div', { class: 'thumb-name', title: img.path }, basename(img.path),
      el('span', { class: 'muted' }, ` ${img.width}×${img.height}`)),
    caption,
    el('div', { class: 'thumb-meta' }, source, mark),
    problems.map((p) => el('div', { class: 'thumb-problem ' + p.severity }, p.message)));
}

/** The optional prompts and class folder of the dataset view, as /api/dataset names them. */
function datasetExtras() {
  return {
    instance_prompt: $('#ds-instance-prompt').value.trim(),
    class_path: $('#ds-class-path').value.trim(),
    class_prompt: $('#ds-class-prompt').value.trim(),
  };
}

/** Merges `values` into the first subset of `kind` (keeping its other keys), or adds one. */
function mergeSubset(subsets, kind, values) {
  const i = subsets.findIndex((s) => s && (kind === 'class' ? s.kind === 'class' : s.kind !== 'class'));
  const merged = Object.assign({}, i >= 0 ? subsets[i] : {}, values);
  if (i >= 0) subsets[i] = merged;
  else if (kind === 'class') subsets.push(merged);
  else subsets.unshift(merged);
}

/** "Train on this dataset": the folder becomes the (first instance) subset. */
function useDataset() {
  const folder = (state.dataset && state.dataset.path) || $('#ds-path').value.trim();
  if (!folder) {
    showErrors($('#ds-error'), 'Choose the folder with your training images first.');
    return;
  }
  const extra = (state.dataset && state.dataset.extra) || datasetExtras();
  const subsets = Array.isArray(getConfig('dataset.subsets')) ? clone(getConfig('dataset.subsets')) : [];
  mergeSubset(subsets, 'instance', Object.assign({ path: folder, kind: 'instance' }, extra.instance_prompt ? { caption: extra.instance_prompt } : {}));
  if (extra.class_path) {
    mergeSubset(subsets, 'class', Object.assign({ path: extra.class_path, kind: 'class' }, extra.class_prompt ? { caption: extra.class_prompt } : {}));
  }
  setConfig('dataset.subsets', subsets);
  fillForm();
  configChanged();
  showView('train');
  showMsg(`Training images: ${folder}`);
}

/* ════════════════════════════ the config object ════════════════════════════ */

function splitKey(key) {
  const i = key.indexOf('.');
  return [key.slice(0, i), key.slice(i + 1)];
}
function getConfig(key) {
  const [sec, k] = splitKey(key);
  return state.config[sec] ? state.config[sec][k] : undefined;
}
function setConfig(key, value) {
  const [sec, k] = splitKey(key);
  if (!state.config[sec] || typeof state.config[sec] !== 'object') state.config[sec] = {};
  state.config[sec][k] = value;
}
function deleteConfig(key) {
  const [sec, k] = splitKey(key);
  if (!state.config[sec]) return;
  delete state.config[sec][k];
  if (!Object.keys(state.config[sec]).length) delete state.config[sec];
}

/** Replaces the whole config (preset, loaded file), keeping an undo copy. */
function replaceConfig(cfg, message) {
  state.undoConfig = clone(state.config);
  state.config = cfg && typeof cfg === 'object' ? clone(cfg) : {};
  state.serverErrors = [];
  state.actionError = '';
  fillForm();
  configChanged();
  showMsg(message, () => {
    state.config = state.undoConfig || {};
    state.undoConfig = null;
    fillForm();
    configChanged();
    showMsg('Undone.');
  });
}

function showMsg(text, undo) {
  const box = $('#train-msg');
  box.replaceChildren(el('span', {}, text),
    undo ? el('button', { type: 'button', class: 'small link', onclick: undo }, 'Undo') : null);
  box.hidden = !text;
}

/* ════════════════════════════ schema → form ════════════════════════════ */

const SECTION_TITLES = { model: 'Model', network: 'LoRA network', train: 'Training', dataset: 'Dataset', output: 'Output & previews' };

// The keys most people change, shown first in their section (the rest follow in schema order).
const COMMON_KEYS = {
  model: ['path', 'device', 'dtype'],
  network: ['rank', 'alpha', 'type', 'preset', 'train_text_encoder'],
  train: ['steps', 'unet_lr', 'batch_size', 'optimizer', 'lr_scheduler', 'warmup_steps', 'text_encoder_lr', 'seed', 'gradient_checkpointing'],
  dataset: ['subsets', 'resolution', 'bucketing'],
  output: ['dir', 'name', 'sample_prompts', 'sample_every', 'save_every'],
};

// String keys that hold a path get a Browse button ('any': a folder or a file).
const PATH_KEYS = {
  'model.path': 'any', 'model.vae': 'any', 'model.config': 'dir', 'train.latent_cache_dir': 'dir',
  'train.validation_dir': 'dir', 'dataset.kohya_config': 'file', 'output.dir': 'dir',
};

const JSON_EXAMPLES = {
  'dataset.subsets': '[{"path": "my_images", "kind": "instance", "caption": "a photo of ohwx dog"}]',
  'output.sample_prompts': '["a photo of ohwx dog", {"prompt": "ohwx dog on a beach", "seed": 7}]',
};

// Plain-language labels for the keys artists meet first (the TOML key is shown beside them).
const LABELS = {
  'model.path': 'Base model', 'model.device': 'Device', 'network.rank': 'Rank (LoRA size)',
  'train.steps': 'Training steps', 'train.unet_lr': 'Learning rate', 'train.text_encoder_lr': 'Text encoder learning rate',
  'dataset.subsets': 'Image folders', 'output.dir': 'Output folder', 'output.name': 'LoRA file name',
  'output.sample_prompts': 'Preview prompts', 'output.sample_every': 'Preview every N steps',
  'output.save_every': 'Save every N steps',
};

const WORDS = { lr: 'LR', unet: 'UNet', vae: 'VAE', cfg: 'CFG', snr: 'SNR', dtype: 'precision', ip: 'IP', dora: 'DoRA', lokr: 'LoKr', eps: 'ε', te: 'TE', n: 'N' };
function humanize(key) {
  const s = key.split('_').map((w) => WORDS[w] || w).join(' ');
  return s.charAt(0).toUpperCase() + s.slice(1);
}

/** Follows `$ref` into `$defs`; the referring schema's own keys (description, default) win. */
function resolveRef(root, s) {
  for (let i = 0; s && s.$ref && i < 10; i++) {
    const name = String(s.$ref).replace(/^#\/(\$defs|definitions)\//, '');
    const target = (root.$defs || root.definitions || {})[name];
    if (!target) break;
    const rest = Object.assign({}, s);
    delete rest.$ref;
    s = Object.assign({}, target, rest);
  }
  return s || {};
}

const isNullSchema = (a) => a && (a.type === 'null' || a.const === null || (Array.isArray(a.enum) && a.enum.length === 1 && a.enum[0] === null));

function enumOptions(s) {
  if (Array.isArray(s.enum) && s.enum.length && s.enum.every((v) => typeof v === 'string')) {
    return s.enum.map((v) => ({ value: v, description: '' }));
  }
  const alts = s.oneOf || s.anyOf;
  if (Array.isArray(alts) && alts.length && alts.every((a) => typeof a.const === 'string' || (Array.isArray(a.enum) && a.enum.every((v) => typeof v === 'string')))) {
    return alts.flatMap((a) => (a.const !== undefined ? [a.const] : a.enum).map((v) => ({ value: v, description: a.description || '' })));
  }
  return null;
}

/**
 * What kind of field a property schema needs: bool, int, number, string, enum,
 * list (of plain values), any (number/list/string mix), json (tables, maps).
 */
function fieldSpec(root, prop) {
  const spec = { description: prop.description || '', default: prop.default, nullable: false };
  let s = resolveRef(root, prop);
  // Option<T> is anyOf/oneOf [T, null] or type [T, "null"].
  for (const k of ['anyOf', 'oneOf']) {
    if (Array.isArray(s[k]) && s[k].some(isNullSchema)) {
      spec.nullable = true;
      const rest = s[k].filter((a) => !isNullSchema(a));
      s = rest.length === 1 ? resolveRef(root, rest[0]) : { anyOf: rest };
    }
  }
  if (!spec.description) spec.description = s.description || '';
  let type = s.type;
  if (Array.isArray(type)) {
    if (type.includes('null')) spec.nullable = true;
    const t = type.filter((x) => x !== 'null');
    type = t.length === 1 ? t[0] : undefined;
  }
  const options = enumOptions(s);
  if (options) return Object.assign(spec, { kind: 'enum', options });
  if (type === 'boolean') return Object.assign(spec, { kind: 'bool' });
  if (type === 'integer' || type === 'number') {
    return Object.assign(spec, { kind: type === 'integer' ? 'int' : 'number', min: s.minimum, max: s.maximum });
  }
  if (type === 'string') return Object.assign(spec, { kind: 'string' });
  if (type === 'array') {
    const items = resolveRef(root, s.items || {});
    const itemType = Array.isArray(items.type) ? items.type.find((t) => t !== 'null') : items.type;
    if (['string', 'number', 'integer'].includes(itemType) && !enumOptions(items)) {
      return Object.assign(spec, { kind: 'list', itemType });
    }
    return Object.assign(spec, { kind: 'json' });
  }
  const alts = s.anyOf || s.oneOf;
  if (Array.isArray(alts) && alts.some((a) => resolveRef(root, a).type === 'string')) {
    return Object.assign(spec, { kind: 'any' }); // e.g. block weights: 0.5, [1, 0.5], "cosine+0.5"
  }
  return Object.assign(spec, { kind: 'json' });
}

function defaultText(spec) {
  const d = spec.default;
  if (d === undefined) return spec.nullable ? 'not set' : 'required';
  if (d === null) return 'not set';
  if (d === '') return 'empty';
  if (Array.isArray(d) && !d.length) return 'none';
  return typeof d === 'object' ? JSON.stringify(d) : String(d);
}

/* Each control: {node (what goes in the field), input (the element with data-key),
   read() -> {value} | {unset: true} | {error}, write(value | undefined)}. */

function makeControl(key, spec, id) {
  const placeholder = 'default: ' + defaultText(spec);
  const data = { key };
  switch (spec.kind) {
    case 'bool': {
      const input = el('input', { id, type: 'checkbox', dataset: data });
      const text = el('span', { class: 'check-text' });
      const showText = () => { text.textContent = input.checked ? 'on' : 'off'; };
      input.addEventListener('change', showText);
      return {
        node: el('label', { class: 'check' }, input, text),
        input,
        read: () => ({ value: input.checked }),
        write: (v) => { input.checked = v === undefined ? spec.default === true : Boolean(v); showText(); },
      };
    }
    case 'int':
    case 'number': {
      const input = el('input', {
        id, type: 'number', dataset: data, placeholder, step: spec.kind === 'int' ? '1' : 'any',
        min: Number.isFinite(spec.min) ? spec.min : null, max: Number.isFinite(spec.max) ? spec.max : null,
      });
      return {
        node: input, input,
        read: () => {
          // A half-typed number ("1e-") reads as "" with badInput set: not the same as emptied.
          if (input.validity && input.validity.badInput) return { error: 'Type a number.' };
          const raw = input.value.trim();
          if (raw === '') return { unset: true };
          const n = Number(raw);
          if (!Number.isFinite(n)) return { error: 'Type a number.' };
          if (spec.kind === 'int' && !Number.isInteger(n)) return { error: 'Type a whole number.' };
          return { value: n };
        },
        write: (v) => { input.value = v === undefined || v === null ? '' : String(v); },
      };
    }
    case 'enum': {
      const dflt = spec.default == null ? 'not set' : String(spec.default);
      const input = el('select', { id, dataset: data },
        el('option', { value: '' }, `default (${dflt})`),
        spec.options.map((o) => el('option', { value: o.value, title: o.description || null }, o.value)));
      const choiceHelp = el('small', { class: 'choice-help' });
      const showChoice = () => {
        const v = input.value || spec.default;
        const o = spec.options.find((x) => x.value === v);
        choiceHelp.replaceChildren(...(o && o.description ? [el('b', {}, o.value + ': '), ...richText(o.description)] : []));
      };
      input.addEventListener('change', showChoice);
      return {
        node: el('div', {}, input, choiceHelp), input,
        read: () => (input.value === '' ? { unset: true } : { value: input.value }),
        write: (v) => {
          if (v !== undefined && v !== null && !spec.options.some((o) => o.value === v)) {
            input.append(el('option', { value: String(v) }, String(v))); // a value the schema does not list: show it anyway
          }
          input.value = v === undefined || v === null ? '' : String(v);
          showChoice();
        },
      };
    }
    case 'list': {
      const input = el('input', { id, type: 'text', dataset: data, placeholder: spec.itemType === 'string' ? 'comma-separated, e.g. a, b' : 'comma-separated numbers, e.g. 1, 0.5, 0' });
      return {
        node: input, input,
        read: () => {
          const raw = input.value.trim();
          if (raw === '') return { unset: true };
          let items;
          if (raw.startsWith('[')) {
            try { items = JSON.parse(raw); } catch (e) { return { error: 'Not a valid list: ' + e.message }; }
            if (!Array.isArray(items)) return { error: 'Expected a list.' };
          } else {
            items = raw.split(',').map((x) => x.trim()).filter((x) => x !== '');
          }
          if (spec.itemType !== 'string') {
            items = items.map(Number);
            if (items.some((n) => !Number.isFinite(n))) return { error: 'Only numbers, separated by commas.' };
            if (spec.itemType === 'integer' && items.some((n) => !Number.isInteger(n))) return { error: 'Only whole numbers.' };
          }
          return { value: items };
        },
        write: (v) => { input.value = Array.isArray(v) ? v.join(', ') : v === undefined ? '' : JSON.stringify(v); },
      };
    }
    case 'string': {
      const input = el('input', { id, type: 'text', dataset: data, placeholder, spellcheck: 'false' });
      const mode = PATH_KEYS[key];
      return {
        node: mode ? el('div', { class: 'with-button' }, input, browseButton(input, mode, `Choose ${humanize(splitKey(key)[1]).toLowerCase()}`)) : input,
        input,
        read: () => (input.value === '' ? { unset: true } : { value: input.value }),
        write: (v) => { input.value = v === undefined || v === null ? '' : String(v); },
      };
    }
    default: { // json, any
      const lenient = spec.kind === 'any';
      const input = el('textarea', {
        id, class: 'json', dataset: data, spellcheck: 'false', rows: lenient ? 1 : 3,
        placeholder: JSON_EXAMPLES[key] || (lenient ? 'a number, [a list], or a name' : placeholder),
      });
      return {
        node: input, input,
        read: () => {
          const raw = input.value.trim();
          if (raw === '') return { unset: true };
          try { return { value: JSON.parse(raw) }; } catch (e) {
            // Like `--set`, a value that is not JSON is taken as a string where a string is allowed.
            if (lenient) return { value: raw };
            return { error: 'Not valid JSON: ' + e.message };
          }
        },
        write: (v) => {
          if (v === undefined) input.value = '';
          else if (lenient && typeof v === 'string') input.value = v;
          else input.value = JSON.stringify(v, null, Array.isArray(v) && v.every((x) => typeof x !== 'object') ? 0 : 2);
        },
      };
    }
  }
}

/** dataset.subsets: rows for the usual keys, plus the JSON of every key. */
function makeSubsetsControl(key, spec, id) {
  const json = makeControl(key, Object.assign({}, spec, { kind: 'json' }), id);
  const rows = el('div', { class: 'subset-rows' });
  let field = null;

  const rowsValue = () => $$('.subset-row', rows).map((row) => {
    const o = Object.assign({}, row.base);
    const path = $('.subset-path', row).value.trim();
    const kind = $('.subset-kind', row).value;
    const caption = $('.subset-caption', row).value;
    const repeats = $('.subset-repeats', row).value.trim();
    if (path) o.path = path; else delete o.path;
    if (kind === 'class' || o.kind !== undefined) o.kind = kind;
    if (caption.trim()) o.caption = caption; else delete o.caption;
    if (repeats !== '' && Number.isInteger(Number(repeats))) o.repeats = Number(repeats); else delete o.repeats;
    return o;
  }).filter((o) => Object.keys(o).length);

  const rowsEdited = () => {
    const v = rowsValue();
    json.write(v.length ? v : undefined);
    applyFieldResult(field, v.length ? { value: v } : { unset: true });
  };

  const subsetRow = (sub) => {
    const path = el('input', { class: 'subset-path', type: 'text', value: sub.path || '', placeholder: 'image folder', spellcheck: 'false', 'aria-label': 'image folder' });
    const kind = el('select', { class: 'subset-kind', 'aria-label': 'kind' },
      el('option', { value: 'instance' }, 'instance'),
      el('option', { value: 'class' }, 'class (regularisation)'));
    kind.value = sub.kind === 'class' ? 'class' : 'instance';
    const row = el('div', { class: 'subset-row' },
      el('div', { class: 'with-button' }, path, browseButton(path, 'dir', 'Choose an image folder')),
      kind,
      el('input', { class: 'subset-caption', type: 'text', value: sub.caption || '', placeholder: 'caption, e.g. a photo of ohwx dog', 'aria-label': 'caption' }),
      el('input', { class: 'subset-repeats', type: 'number', min: 1, step: 1, value: sub.repeats ?? '', placeholder: 'repeats', 'aria-label': 'repeats' }),
      el('button', { type: 'button', class: 'small remove', title: 'Remove this folder', onclick: () => { row.remove(); rowsEdited(); } }, '✕'));
    row.base = sub;
    row.addEventListener('input', (e) => { e.stopPropagation(); rowsEdited(); });
    row.addEventListener('change', (e) => { e.stopPropagation(); rowsEdited(); });
    return row;
  };

  const buildRows = (v) => {
    const list = Array.isArray(v) ? v.filter((x) => x && typeof x === 'object') : [];
    rows.replaceChildren(...(list.length ? list : [{}]).map(subsetRow));
  };

  return {
    node: el('div', { class: 'subsets-editor' },
      rows,
      el('button', { type: 'button', class: 'small', onclick: () => rows.append(subsetRow({})) }, '+ Add an image folder'),
      el('label', { class: 'sub-label', for: id }, 'Every subset option, as JSON'),
      json.node),
    input: json.input,
    read: json.read,
    write: (v) => { json.write(v); buildRows(v); },
    bind: (f) => { field = f; },
    // Rows follow JSON edits only when the JSON is valid.
    afterJsonEdit: (r) => { if (!r.error) buildRows(r.value); },
  };
}

function makeField(section, key, spec) {
  const full = `${section}.${key}`;
  const id = 'f-' + full.replace(/[^a-z0-9]+/gi, '-');
  const control = full === 'dataset.subsets' ? makeSubsetsControl(full, spec, id) : makeControl(full, spec, id);
  const label = LABELS[full] || humanize(key);
  const [first, rest] = splitHelp(spec.description);
  const more = rest ? el('span', { class: 'help-more', hidden: true }, ' ', ...richText(rest)) : null;
  const help = el('small', { class: 'help', title: spec.description.replace(/`/g, '') }, ...richText(first),
    more ? [more, ' ', el('button', {
      type: 'button', class: 'link more', 'aria-expanded': 'false',
      onclick: (e) => { more.hidden = !more.hidden; e.target.textContent = more.hidden ? 'more' : 'less'; e.target.setAttribute('aria-expanded', String(!more.hidden)); },
    }, 'more')] : null);
  const reset = el('button', { type: 'button', class: 'reset link', title: 'Back to the default (' + defaultText(spec) + ')' }, 'reset');
  const errorEl = el('div', { class: 'field-error', role: 'alert' });
  const wide = ['json', 'any', 'list'].includes(spec.kind) || full === 'dataset.subsets';
  const wrap = el('div', { class: `field kind-${spec.kind}` + (wide ? ' wide' : ''), dataset: { key: full } },
    el('div', { class: 'field-head' },
      el('label', { for: id }, label, ' ',
        // The TOML key too, where the label does not already spell it.
        label.toLowerCase() !== key.replace(/_/g, ' ') ? el('code', { class: 'key' }, key) : null), reset),
    control.node, help, errorEl);
  const field = { key: full, spec, control, wrap, errorEl };
  if (control.bind) control.bind(field);
  const onEdit = () => {
    const r = control.read();
    applyFieldResult(field, r);
    if (control.afterJsonEdit) control.afterJsonEdit(r);
  };
  control.input.addEventListener(spec.kind === 'bool' || spec.kind === 'enum' ? 'change' : 'input', onEdit);
  reset.addEventListener('click', () => { control.write(undefined); applyFieldResult(field, { unset: true }); });
  return field;
}

/** Puts what a field read into the config (or marks it unparsable), then re-checks. */
function applyFieldResult(field, r) {
  if (r.error) {
    state.localErrors[field.key] = r.error;
  } else {
    delete state.localErrors[field.key];
    if (r.unset) deleteConfig(field.key); else setConfig(field.key, r.value);
  }
  markSet(field);
  renderFieldErrors();
  if (!r.error) configChanged();
}

function markSet(field) {
  field.wrap.classList.toggle('is-set', getConfig(field.key) !== undefined);
  const fs = field.wrap.closest('fieldset');
  if (fs && $('.set-count', fs)) {
    const n = $$('.field.is-set', fs).length;
    $('.set-count', fs).textContent = n ? `${n} changed` : '';
  }
}

function buildForm(schema) {
  const form = $('#train-form');
  state.fields.clear();
  const sets = (schema.sections || []).map(({ table, schema: root }) => {
    const props = (root && root.properties) || {};
    const common = (COMMON_KEYS[table] || []).filter((k) => k in props);
    const others = Object.keys(props).filter((k) => !common.includes(k));
    const fieldsOf = (keys) => keys.map((k) => {
      const f = makeField(table, k, fieldSpec(root, props[k]));
      state.fields.set(f.key, f);
      return f.wrap;
    });
    const body = el('div', { class: 'section-body' },
      root.description ? el('p', { class: 'section-desc' }, ...richText(root.description)) : null,
      el('div', { class: 'fields' }, fieldsOf(common)),
      others.length && common.length ? el('div', { class: 'more-divider' }, 'More options') : null,
      el('div', { class: 'fields' }, fieldsOf(others)));
    const toggle = el('button', { type: 'button', class: 'section-toggle', 'aria-expanded': 'true' },
      SECTION_TITLES[table] || humanize(table), ' ', el('code', {}, `[${table}]`), ' ', el('span', { class: 'set-count muted' }));
    const fs = el('fieldset', { class: 'section', dataset: { section: table } }, el('legend', {}, toggle), body);
    toggle.addEventListener('click', () => {
      const collapsed = fs.classList.toggle('collapsed');
      toggle.setAttribute('aria-expanded', String(!collapsed));
    });
    return fs;
  });
  form.replaceChildren(...sets);
  fillForm();
}

/** Shows the config's values in the form (after a preset, a load, an undo). */
function fillForm() {
  for (const f of state.fields.values()) {
    f.control.write(clone(getConfig(f.key)));
    delete state.localErrors[f.key];
    markSet(f);
  }
  renderFieldErrors();
}

async function loadSchema() {
  const form = $('#train-form');
  form.replaceChildren(el('p', { class: 'loading' }, 'Loading the settings…'));
  try {
    buildForm(await api('GET', '/api/schema'));
    configChanged(0);
  } catch (e) {
    form.replaceChildren(el('div', { class: 'error' }, 'Could not load the settings: ' + e.message, ' ',
      el('button', { type: 'button', class: 'small', onclick: loadSchema }, 'Try again')));
  }
}

/* ════════════════════════════ checking the config ════════════════════════════ */

let checkTimer = null;
let checkSeq = 0;

/** Every edit lands here: remember the config and check it after a pause in typing. */
function configChanged(delay = 500) {
  storeSet('config', state.config);
  clearTimeout(checkTimer);
  setCheckState('pending', 'checking…');
  $('#estimate').classList.add('stale');
  checkTimer = setTimeout(runCheck, delay);
  defaultGenModel();
}

function setCheckState(st, text) {
  const c = $('#check-state');
  c.dataset.state = st;
  c.textContent = text;
}

async function runCheck() {
  const mine = ++checkSeq; // answers to older checks are dropped
  try {
    const r = await api('POST', '/api/config/check', { config: state.config });
    if (mine !== checkSeq) return;
    state.serverErrors = r.errors || [];
    $('#estimate').textContent = r.estimate || '—';
    $('#command').textContent = r.command || '—';
    $('#dry-run-text').textContent = r.report || '—';
    $('#toml-text').textContent = r.toml || '—';
    const n = state.serverErrors.length;
    setCheckState(r.ok && !n ? 'ok' : 'bad', r.ok && !n ? 'ready ✓' : `${n || 'some'} problem${n === 1 ? '' : 's'} to fix`);
  } catch (e) {
    if (mine !== checkSeq) return;
    state.serverErrors = [{ key: e.key, field: e.field, message: 'Could not check the settings: ' + e.message }];
    setCheckState('bad', 'not checked');
  }
  $('#estimate').classList.remove('stale');
  renderFieldErrors();
}

/** The field a key belongs to: `dataset.subsets[0].path` -> the dataset.subsets field. */
function fieldFor(key) {
  let k = String(key || '');
  while (k) {
    if (state.fields.has(k)) return state.fields.get(k);
    const m = /^(.*)(\[\d+\]|\.[^.[\]]*)$/.exec(k);
    if (!m) return null;
    k = m[1];
  }
  return null;
}

function renderFieldErrors() {
  const byField = new Map();
  const general = [];
  const add = (f, msg) => { if (!byField.has(f)) byField.set(f, []); byField.get(f).push(msg); };
  for (const [k, msg] of Object.entries(state.localErrors)) if (state.fields.has(k)) add(state.fields.get(k), msg);
  for (const e of state.serverErrors) {
    const f = (e.field && state.fields.get(e.field)) || (e.key ? fieldFor(e.key) : null);
    if (f && state.localErrors[f.key]) continue; // about the value before the unfinished edit
    if (f) add(f, e.key && e.key !== f.key ? `${e.key}: ${e.message}` : e.message);
    else general.push(e.key ? `${e.key}: ${e.message}` : e.message);
  }
  for (const f of state.fields.values()) {
    const msgs = byField.get(f) || [];
    f.errorEl.textContent = msgs.join('\n');
    f.wrap.classList.toggle('has-error', msgs.length > 0);
    if (msgs.length && f.wrap.closest('fieldset')) f.wrap.closest('fieldset').classList.remove('collapsed');
  }
  showErrors($('#train-errors'), [state.actionError, ...general]);
}

/* ════════════════════════════ train actions ════════════════════════════ */

async function loadInfo() {
  try {
    const info = await api('GET', '/api/info');
    state.info = info;
    showErrors($('#global-error'), []);
    $('#app-version').textContent = info.version ? 'v' + info.version : '';
    const sel = $('#preset');
    const presets = info.presets || [];
    sel.replaceChildren(...(presets.length
      ? presets.map((p) => el('option', { value: p.id, title: p.description || null }, p.label || p.id))
      : [el('option', { value: '' }, 'no presets')]));
    $('#preset-apply').disabled = !presets.length;
  } catch (e) {
    showErrors($('#global-error'), e.message);
    $('#preset').replaceChildren(el('option', { value: '' }, 'presets unavailable'));
  }
}

async function applyPreset() {
  const id = $('#preset').value;
  if (!id) return;
  await busy($('#preset-apply'), async () => {
    try {
      const r = await api('GET', '/api/presets/' + enc(id));
      const cfg = clone(r.config || {});
      // A preset says how to train, not on what or where to: keep the user's images and output folder.
      for (const key of ['dataset.subsets', 'output.dir']) {
        const [sec, k] = splitKey(key);
        if (getConfig(key) !== undefined && !(cfg[sec] && cfg[sec][k] !== undefined)) {
          cfg[sec] = Object.assign({}, cfg[sec], { [k]: clone(getConfig(key)) });
        }
      }
      const label = $('#preset').selectedOptions[0] ? $('#preset').selectedOptions[0].textContent : id;
      replaceConfig(cfg, `Preset “${label}” applied.`);
    } catch (e) {
      state.actionError = e.message;
      renderFieldErrors();
    }
  });
}

async function loadConfigFile() {
  const path = $('#cfg-path').value.trim();
  if (!path) { state.actionError = 'Type or browse to a config file to load.'; renderFieldErrors(); return; }
  await busy($('#cfg-load'), async () => {
    try {
      const r = await api('POST', '/api/config/load', { path });
      replaceConfig(r.config, `Loaded ${path}.`);
    } catch (e) {
      state.actionError = e.message;
      renderFieldErrors();
    }
  });
}

async function saveConfigFile() {
  const path = $('#cfg-path').value.trim();
  if (!path) { state.actionError = 'Type a file name to save the config to, e.g. my-lora.toml.'; renderFieldErrors(); return; }
  await busy($('#cfg-save'), async () => {
    try {
      const r = await api('POST', '/api/config/save', { path, config: state.config });
      state.actionError = '';
      renderFieldErrors();
      showMsg(`Saved to ${r.path}`);
    } catch (e) {
      state.actionError = e.message;
      renderFieldErrors();
    }
  });
}

async function startTraining(resume) {
  const btn = $(resume ? '#train-resume' : '#train-start');
  if (Object.keys(state.localErrors).length) {
    state.actionError = 'Fix the marked fields first.';
    renderFieldErrors();
    return;
  }
  await busy(btn, async () => {
    state.actionError = '';
    try {
      const js = await api('POST', '/api/train/start', { config: state.config, resume });
      renderFieldErrors();
      attachJob(js);
    } catch (e) {
      const f = (e.field && state.fields.get(e.field)) || (e.key ? fieldFor(e.key) : null);
      if (f) {
        state.serverErrors = [{ key: e.key, field: f.key, message: e.message }];
        f.wrap.scrollIntoView({ block: 'center', behavior: 'smooth' });
      } else {
        state.actionError = e.status === 409 ? 'A run is already going: wait for it or stop it first.' : e.message;
      }
      renderFieldErrors();
    }
  });
}

async function stopJob(btn) {
  await busy(btn, async () => {
    try {
      const js = await api('POST', '/api/job/stop', {});
      job.stopping = true;
      if (js && js.status) job.status = js.status;
    } catch (e) {
      if (job.kind === 'generate') showErrors($('#gen-error'), e.message);
      else { state.actionError = e.message; renderFieldErrors(); }
    }
  });
}

/* ════════════════════════════ the running job ════════════════════════════ */

const job = {
  id: null, kind: null, status: 'idle', command: '', nextSeq: 0,
  es: null, retry: 0, retryTimer: null, reconnecting: false,
  step: 0, total: 0, start: 0, eta: null, secondsPerStep: null, prepare: null, skipped: 0,
  loraFile: null, interrupted: false, images: [], previews: [], selectedPreview: -1, stopping: false,
};

function resetJob(js) {
  Object.assign(job, {
    id: js.id, kind: js.kind, status: js.status, command: js.command || '', nextSeq: 0,
    step: 0, total: 0, start: 0, eta: null, secondsPerStep: null, prepare: null, skipped: 0,
    loraFile: null, interrupted: false, images: [], previews: [], selectedPreview: -1, stopping: false,
  });
  if (js.kind === 'generate') {
    $('#gen-log').replaceChildren();
    $('#gen-log').hidden = true;
    showErrors($('#gen-error'), []);
  } else {
    $('#log').replaceChildren();
    chartReset();
    job.previewsDirty = true;
  }
}

/** Shows a job (from GET /api/job or a start) and follows it. Safe to call again for the same job. */
function attachJob(js) {
  closeStream();
  if (!js) {
    job.id = null;
    job.status = 'idle';
    renderJobNow();
    return;
  }
  if (js.id !== job.id) resetJob(js);
  job.kind = js.kind || job.kind;
  job.status = js.status || job.status;
  for (const ev of js.events || []) handleEvent(ev);
  if (js.status) job.status = js.status; // the server's word wins over replayed events
  if (job.status === 'running') openStream();
  renderJobNow();
}

let jobRefresh = null;
/** GET /api/job and show it; concurrent callers share one request. */
function refreshJob() {
  if (!jobRefresh) {
    jobRefresh = api('GET', '/api/job')
      .then(attachJob)
      .catch(() => { if (job.status === 'running') scheduleReconnect(); })
      .finally(() => { jobRefresh = null; });
  }
  return jobRefresh;
}

function openStream() {
  closeStream();
  const es = new EventSource('/api/job/events?from=' + job.nextSeq);
  job.es = es;
  es.onopen = () => { job.retry = 0; job.reconnecting = false; scheduleJobRender(); };
  es.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    handleEvent(ev);
  };
  // The browser would reconnect on its own with the old ?from=, so close and
  // reconnect ourselves from the next unseen event instead.
  es.onerror = () => {
    closeStream();
    if (job.status === 'running') scheduleReconnect();
  };
}

function closeStream() {
  if (job.es) { job.es.onerror = null; job.es.close(); job.es = null; }
  clearTimeout(job.retryTimer);
}

function scheduleReconnect() {
  clearTimeout(job.retryTimer);
  job.reconnecting = true;
  scheduleJobRender();
  const delay = Math.min(10000, 500 * 2 ** job.retry++);
  job.retryTimer = setTimeout(refreshJob, delay); // GET /api/job also tells whether it ended meanwhile
}

const EVENT_HANDLERS = {
  started: (ev) => { if (ev.kind) job.kind = ev.kind; if (ev.command) { job.command = ev.command; appendLog('$ ' + ev.command, 'cmd'); } },
  prepare: (ev) => { job.prepare = ev; },
  begin: (ev) => {
    job.total = ev.total || 0;
    job.start = ev.start || 0;
    job.step = job.start;
    job.prepare = null;
  },
  step: (ev) => {
    job.step = ev.step;
    if (ev.total) job.total = ev.total;
    job.eta = ev.eta_seconds;
    job.secondsPerStep = ev.seconds;
    job.prepare = null;
    if (ev.skipped) job.skipped++;
    if (job.kind !== 'generate') chartAdd(ev);
  },
  preview: (ev) => { job.previews.push(ev); job.selectedPreview = -1; job.previewsDirty = true; },
  note: (ev) => appendLog(ev.message, 'note'),
  log: (ev) => appendLog(ev.line, 'log'),
  done: (ev) => {
    job.loraFile = ev.lora_file || null;
    job.interrupted = Boolean(ev.interrupted);
    if (ev.lora_file) { state.lastLora = ev.lora_file; storeSet('lastLora', ev.lora_file); }
  },
  images: (ev) => { job.images.push(...(ev.files || [])); },
  exit: (ev) => {
    job.status = ev.status || 'finished';
    job.exitCode = ev.code;
    job.eta = null;
    job.stopping = false;
    closeStream();
    if (job.kind === 'generate') loadGallery();
    if (job.status === 'failed') appendLog(`The run failed (exit code ${ev.code ?? '?'}). The lines above say why.`, 'error');
  },
};

function handleEvent(ev) {
  if (!ev || typeof ev.seq !== 'number') return;
  if (ev.job != null && job.id != null && ev.job !== job.id) {
    // A newer run started (from another tab?): load it properly.
    if (ev.job > job.id) refreshJob();
    return;
  }
  if (ev.seq < job.nextSeq) return; // seen already (replayed after a reconnect)
  job.nextSeq = ev.seq + 1;
  const fn = EVENT_HANDLERS[ev.type];
  if (fn) fn(ev);
  scheduleJobRender();
}

function appendLog(line, cls) {
  const pre = $(job.kind === 'generate' ? '#gen-log' : '#log');
  pre.hidden = false;
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
  pre.append(el('span', { class: cls || '' }, String(line ?? '') + '\n'));
  while (pre.childNodes.length > 2000) pre.firstChild.remove(); // keep long runs cheap
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

let jobRenderPending = false;
function scheduleJobRender() {
  if (jobRenderPending) return;
  jobRenderPending = true;
  requestAnimationFrame(() => { jobRenderPending = false; renderJobNow(); });
}

function jobPillText() {
  if (!job.id) return 'idle';
  const what = job.kind === 'generate' ? 'generating' : 'training';
  if (job.status !== 'running') return `${job.kind === 'generate' ? 'generation' : 'training'} ${job.status}`;
  let t = what;
  if (job.prepare) t += `: ${job.prepare.what} ${job.prepare.done}/${job.prepare.total}`;
  else if (job.total) t += ` ${job.step}/${job.total}`;
  else if (job.kind === 'generate' && job.images.length) t += ` (${job.images.length} done)`;
  if (job.stopping) t += ' (stopping)';
  if (job.reconnecting) t += ' (reconnecting…)';
  return t;
}

function renderJobNow() {
  const running = job.status === 'running';
  const pill = $('#header-job');
  pill.textContent = jobPillText();
  pill.dataset.state = job.id ? job.status : 'idle';

  $('#job-kind').textContent = !job.id ? 'Run' : job.kind === 'generate' ? 'Generation' : 'Training';
  $('#job-status').textContent = job.id ? job.status : 'idle';
  $('#job-status').dataset.state = job.id ? job.status : 'idle';
  $('#progress-step').textContent = job.total ? `step ${job.step}/${job.total}` : '';
  const bar = $('#progress-bar');
  if (job.prepare && job.prepare.total) { bar.max = job.prepare.total; bar.value = job.prepare.done; }
  else if (job.total) { bar.max = job.total; bar.value = job.status === 'finished' ? job.total : job.step; }
  else { bar.max = 1; bar.value = job.status === 'finished' ? 1 : 0; }
  $('#eta').textContent = running && Number.isFinite(job.eta)
    ? `about ${fmtDuration(job.eta)} left` + (job.secondsPerStep ? ` · ${fmtNum(job.secondsPerStep)} s/step` : '') : '';
  $('#progress-detail').textContent = !running
    ? (job.status === 'failed' ? 'The run failed: the log below says why.' : job.skipped ? `${job.skipped} steps skipped (non-finite loss)` : '')
    : job.stopping ? 'Stopping after this step and saving…'
      : job.prepare ? `${job.prepare.what}: ${job.prepare.done}/${job.prepare.total}`
        : !job.total ? 'Starting… (loading the model can take a while)' : '';

  $('#train-start').disabled = running;
  $('#train-resume').disabled = running;
  $('#train-stop').disabled = !running || job.kind === 'generate';
  $('#gen-run').disabled = running;
  $('#gen-stop').disabled = !running || job.kind !== 'generate';

  const trained = job.kind === 'train' && job.loraFile;
  $('#train-result').hidden = !trained;
  if (trained) $('#train-lora-file').textContent = job.loraFile + (job.interrupted ? ' (stopped early)' : '');
  $('#gen-use-trained').hidden = !state.lastLora;
  if (state.lastLora) $('#gen-use-trained').title = 'Open Generate with ' + basename(state.lastLora);

  if (job.kind === 'generate') renderGenStatus();
  if (job.previewsDirty) { job.previewsDirty = false; renderPreviews(); }
}

function renderGenStatus() {
  const st = $('#gen-status');
  if (job.status === 'running') {
    st.textContent = job.prepare ? `${job.prepare.what} ${job.prepare.done}/${job.prepare.total}…`
      : job.total ? `Generating: step ${job.step}/${job.total}…` : 'Generating…';
  } else if (job.status === 'finished') {
    st.textContent = `Done: ${job.images.length} image${job.images.length === 1 ? '' : 's'}.`;
  } else {
    st.textContent = `Generation ${job.status}.`;
  }
}

function renderPreviews() {
  const box = $('#previews');
  const list = job.previews;
  if (!list.length) { box.replaceChildren(); return; }
  const shown = job.selectedPreview >= 0 ? job.selectedPreview : list.length - 1;
  const p = list[shown];
  box.replaceChildren(
    el('figure', { class: 'preview-main' },
      el('a', { href: fileUrl(p.grid), target: '_blank', rel: 'noopener' }, el('img', { src: fileUrl(p.grid), alt: `previews at step ${p.step}` })),
      el('figcaption', {}, `Previews at step ${p.step}` + (shown === list.length - 1 ? ' (newest)' : ''))),
    list.length > 1 ? el('div', { class: 'preview-thumbs' }, list.map((q, i) => el('button', {
      type: 'button', class: 'preview-thumb' + (i === shown ? ' active' : ''), title: `step ${q.step}`,
      onclick: () => { job.selectedPreview = i; renderPreviews(); },
    }, el('img', { src: thumbUrl(q.grid, 256), alt: `step ${q.step}`, loading: 'lazy' }), el('span', {}, String(q.step)))).reverse()) : null);
}

/* ════════════════════════════ loss chart ════════════════════════════ */

const chart = { steps: [], loss: [], ema: [], val: [], pending: false };

function chartReset() {
  chart.steps = []; chart.loss = []; chart.ema = []; chart.val = [];
  drawChartSoon();
}

function chartAdd(ev) {
  if (Number.isFinite(ev.val_loss)) chart.val.push([ev.step, ev.val_loss]);
  if (ev.skipped || !Number.isFinite(ev.loss)) { drawChartSoon(); return; }
  chart.steps.push(ev.step);
  chart.loss.push(ev.loss);
  chart.ema.push(Number.isFinite(ev.loss_ema) ? ev.loss_ema : NaN);
  drawChartSoon();
}

// Many points can arrive at once (a reattach replays the whole run): draw once per frame.
function drawChartSoon() {
  if (chart.pending) return;
  chart.pending = true;
  requestAnimationFrame(() => { chart.pending = false; drawChart(); });
}

function drawChart() {
  const c = $('#loss-chart');
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth || 480;
  const h = c.clientHeight || 200;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const g = c.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  g.font = '11px system-ui, sans-serif';
  const n = chart.steps.length;
  c.dataset.points = String(n);
  renderLegend();
  if (!n && !chart.val.length) {
    g.fillStyle = '#8a94a6';
    g.textAlign = 'center';
    g.fillText('The loss curve appears here once training runs.', w / 2, h / 2);
    return;
  }
  let [y0, y1] = range(chart.loss, chart.ema, chart.val.map((v) => v[1]));
  if (y1 - y0 < 1e-9) { y0 -= 0.5 * Math.abs(y0 || 1); y1 += 0.5 * Math.abs(y1 || 1); }
  const [x0, xMax] = range(chart.steps, chart.val.map((v) => v[0]));
  const x1 = Math.max(x0 + 1, xMax);
  const pad = { l: 52, r: 10, t: 8, b: 20 };
  const X = (s) => pad.l + ((s - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (v) => pad.t + (1 - (v - y0) / (y1 - y0)) * (h - pad.t - pad.b);

  // axes and min/max labels
  g.strokeStyle = '#d6dbe4';
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(pad.l, pad.t); g.lineTo(pad.l, h - pad.b); g.lineTo(w - pad.r, h - pad.b);
  g.moveTo(pad.l, pad.t + 0.5); g.lineTo(w - pad.r, pad.t + 0.5);
  g.stroke();
  g.fillStyle = '#5b6577';
  g.textAlign = 'right';
  g.textBaseline = 'top';
  g.fillText(fmtNum(y1), pad.l - 4, pad.t);
  g.textBaseline = 'bottom';
  g.fillText(fmtNum(y0), pad.l - 4, h - pad.b);
  g.textBaseline = 'top';
  g.textAlign = 'left';
  g.fillText(String(x0), pad.l, h - pad.b + 4);
  g.textAlign = 'right';
  g.fillText('step ' + x1, w - pad.r, h - pad.b + 4);

  const trace = (vals, style, width) => {
    g.strokeStyle = style;
    g.lineWidth = width;
    g.beginPath();
    let moved = false;
    for (let i = 0; i < n; i++) {
      if (!Number.isFinite(vals[i])) continue;
      if (moved) g.lineTo(X(chart.steps[i]), Y(vals[i]));
      else { g.moveTo(X(chart.steps[i]), Y(vals[i])); moved = true; }
    }
    g.stroke();
  };
  trace(chart.loss, 'rgba(59, 111, 230, 0.35)', 1);
  trace(chart.ema, '#1f4fc7', 2.2);
  g.fillStyle = '#e07b00';
  for (const [s, v] of chart.val) {
    g.beginPath();
    g.arc(X(s), Y(v), 3.5, 0, 2 * Math.PI);
    g.fill();
  }
}

/** Min and max of the finite values of some arrays (no spread: runs can have 100k points). */
function range(...arrays) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const a of arrays) {
    for (const v of a) {
      if (!Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  return [lo, hi];
}

function renderLegend() {
  const last = (a) => { for (let i = a.length - 1; i >= 0; i--) if (Number.isFinite(a[i])) return a[i]; return NaN; };
  const item = (cls, label, v) => el('span', { class: 'legend ' + cls }, el('i'), `${label} ${fmtNum(v)}`);
  const items = [item('raw', 'loss', last(chart.loss)), item('ema', 'average', last(chart.ema))];
  if (chart.val.length) items.push(item('val', 'validation', chart.val[chart.val.length - 1][1]));
  $('#chart-legend').replaceChildren(...items);
}

/* ════════════════════════════ generate view ════════════════════════════ */

function defaultGenModel() {
  if (state.genModelTouched) return;
  $('#gen-model').value = getConfig('model.path') || 'builtin:tiny';
}

function loraRow(path = '', weight = 1) {
  const input = el('input', { class: 'lora-path', type: 'text', value: path, placeholder: 'a .safetensors LoRA file', spellcheck: 'false', 'aria-label': 'LoRA file' });
  const row = el('div', { class: 'lora-row' },
    input,
    browseButton(input, 'file', 'Choose a LoRA file'),
    el('input', { class: 'lora-weight', type: 'number', step: '0.05', value: String(weight), title: 'strength', 'aria-label': 'strength' }),
    el('button', { type: 'button', class: 'small remove lora-remove', title: 'Remove', onclick: () => row.remove() }, '✕'));
  return row;
}

/** Adds the trained LoRA to Generate (once) and goes there. */
function useTrainedLora() {
  const path = state.lastLora;
  if (!path) return;
  showView('generate');
  const have = $$('.lora-row .lora-path', $('#gen-loras')).some((i) => i.value.trim() === path);
  if (!have) {
    // Reuse an empty row rather than leaving it dangling above the new one.
    const empty = $$('.lora-row', $('#gen-loras')).find((r) => !$('.lora-path', r).value.trim());
    if (empty) $('.lora-path', empty).value = path;
    else $('#gen-loras').append(loraRow(path, 1));
  }
  // A trained LoRA wants its trigger words: start from the training caption.
  const subs = getConfig('dataset.subsets');
  const caption = Array.isArray(subs) && subs[0] && subs[0].caption;
  if (!$('#gen-prompt').value.trim() && caption) $('#gen-prompt').value = caption;
  $('#gen-status').textContent = `Added ${basename(path)}. Write a prompt and press Generate.`;
}

function genNumber(sel, int, fallback) {
  const raw = $(sel).value.trim();
  if (raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n)) throw new Error(`${$(sel).labels[0] ? $(sel).labels[0].textContent : sel} must be a number.`);
  return int ? Math.round(n) : n;
}

function genRequest() {
  const loras = $$('.lora-row', $('#gen-loras')).map((r) => ({
    path: $('.lora-path', r).value.trim(),
    weight: Number($('.lora-weight', r).value || 1),
  })).filter((l) => l.path);
  return {
    model: $('#gen-model').value.trim() || 'builtin:tiny',
    loras,
    prompt: $('#gen-prompt').value,
    negative: $('#gen-negative').value,
    sampler: $('#gen-sampler').value,
    steps: genNumber('#gen-steps', true, 20),
    cfg: genNumber('#gen-cfg', false, 7),
    // An empty seed means a new one each time; it is written into the image, so nothing is lost.
    seed: genNumber('#gen-seed', true, Math.floor(Math.random() * 2 ** 31)),
    width: genNumber('#gen-width', true, null),
    height: genNumber('#gen-height', true, null),
    num_images: genNumber('#gen-count', true, 1),
  };
}

async function runGenerate(e) {
  if (e) e.preventDefault();
  showErrors($('#gen-error'), []);
  let body;
  try { body = genRequest(); } catch (err) { showErrors($('#gen-error'), err.message); return; }
  await busy($('#gen-run'), async () => {
    $('#gen-status').textContent = 'Starting…';
    try {
      attachJob(await api('POST', '/api/generate', body));
    } catch (err) {
      $('#gen-status').textContent = '';
      showErrors($('#gen-error'), err.status === 409 ? 'A run is already going: wait for it or stop it first.' : err.message);
    }
  });
}

async function loadGallery() {
  const box = $('#gallery');
  state.galleryLoaded = true;
  if (!box.querySelector('.gallery-item')) box.replaceChildren(el('p', { class: 'loading' }, 'Loading the gallery…'));
  try {
    const r = await api('GET', '/api/gallery');
    const items = (r.images || []).map(galleryItem);
    box.replaceChildren(...(items.length ? items : [el('p', { class: 'empty' }, 'No images yet. What you generate appears here, newest first.')]));
  } catch (e) {
    box.replaceChildren(el('p', { class: 'error' }, 'Could not load the gallery: ' + e.message));
  }
}

function galleryItem(img) {
  const s = img.settings || null;
  return el('figure', { class: 'gallery-item', dataset: { path: img.path } },
    el('a', { href: fileUrl(img.path), target: '_blank', rel: 'noopener' },
      el('img', { src: thumbUrl(img.path, 256), alt: (s && s.prompt) || basename(img.path), loading: 'lazy' })),
    el('figcaption', {},
      el('pre', { class: 'params' }, img.parameters || '(no generation settings stored in this image)'),
      el('div', { class: 'gallery-actions' },
        el('button', { type: 'button', class: 'small use-settings', disabled: !s, onclick: () => useSettings(s) }, 'Use these settings'),
        el('span', { class: 'muted', title: img.path }, basename(img.path)))));
}

/** Fills the Generate form from an image's settings. */
function useSettings(s) {
  if (!s) return;
  const set = (sel, v) => { if (v !== undefined && v !== null) $(sel).value = String(v); };
  set('#gen-prompt', s.prompt);
  $('#gen-negative').value = s.negative || '';
  if (s.sampler && $$('#gen-sampler option').some((o) => o.value === s.sampler)) $('#gen-sampler').value = s.sampler;
  set('#gen-steps', s.steps);
  set('#gen-cfg', s.cfg);
  set('#gen-seed', s.seed);
  $('#gen-width').value = s.width ?? '';
  $('#gen-height').value = s.height ?? '';
  if (s.model) { $('#gen-model').value = s.model; state.genModelTouched = true; }
  if (Array.isArray(s.loras)) {
    $('#gen-loras').replaceChildren(...s.loras.map((l) => loraRow(l.path || l.name || '', l.weight ?? 1)));
  }
  $('#gen-status').textContent = 'Settings filled in from the image.';
  $('#gen-form').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

/* ════════════════════════════ LoRA files view ════════════════════════════ */

const INFO_ROWS = [
  ['format', 'Format'], ['network_type', 'Network type'], ['family', 'Model family'],
  ['base_model_version', 'Made for'], ['modules', 'Modules'], ['linear_modules', 'Linear modules'],
  ['conv_modules', 'Conv modules'], ['ranks', 'Ranks'], ['alphas', 'Alphas'], ['scales', 'Scales (alpha ÷ rank)'],
  ['dora_axis', 'DoRA axis'], ['dtype', 'Precision'], ['file_size', 'File size'], ['network_module', 'Network module'],
  ['top_tags', 'Most used caption tags'], ['model_hash', 'Hash (sha256)'], ['legacy_hash', 'Legacy hash'],
  ['path', 'File'], ['kind', 'Kind'],
];

function fmtValue(key, v) {
  if (v === null || v === undefined) return '—';
  if (key === 'file_size') return fmtBytes(v);
  if (key === 'top_tags' && Array.isArray(v)) return v.map((t) => (Array.isArray(t) ? `${t[0]} (${t[1]})` : String(t))).join(', ');
  if (Array.isArray(v)) return v.map((x) => (typeof x === 'object' ? JSON.stringify(x) : String(x))).join(', ');
  if (typeof v === 'object') return Object.entries(v).map(([k, x]) => `${k}: ${typeof x === 'object' ? JSON.stringify(x) : x}`).join(', ');
  return String(v);
}

function renderLoraInfo(info) {
  const known = new Set(INFO_ROWS.map((r) => r[0]));
  const rows = INFO_ROWS.filter(([k]) => k in info && info[k] !== null);
  // Keys this page does not know yet still show, after the known ones.
  const extra = Object.keys(info).filter((k) => !known.has(k) && !(info[k] && typeof info[k] === 'object' && !Array.isArray(info[k]) && Object.keys(info[k]).length > 6));
  const meta = Object.keys(info).filter((k) => !known.has(k) && !extra.includes(k));
  const tr = (label, value) => el('tr', {}, el('th', {}, label), el('td', {}, value));
  return el('div', {},
    el('table', { class: 'info-table' }, el('tbody', {},
      rows.map(([k, label]) => tr(label, fmtValue(k, info[k]))),
      extra.map((k) => tr(humanize(k), fmtValue(k, info[k]))))),
    meta.map((k) => el('details', { class: 'meta' },
      el('summary', {}, `${k === 'training' ? 'Training metadata' : humanize(k)} (${Object.keys(info[k]).length} entries)`),
      el('table', { class: 'info-table small' }, el('tbody', {},
        Object.entries(info[k]).map(([a, b]) => tr(a, typeof b === 'object' ? JSON.stringify(b) : String(b))))))));
}

async function inspectLora(path) {
  if (path) $('#lora-path').value = path;
  const p = $('#lora-path').value.trim();
  const box = $('#lora-info');
  if (!p) { box.replaceChildren(el('p', { class: 'error' }, 'Choose a LoRA file first.')); return; }
  box.replaceChildren(el('p', { class: 'loading' }, 'Reading the file…'));
  await busy($('#lora-inspect'), async () => {
    try {
      const info = await api('POST', '/api/lora/inspect', { path: p, model: $('#lora-model').value.trim() || null });
      box.replaceChildren(renderLoraInfo(info || {}));
    } catch (e) {
      box.replaceChildren(el('p', { class: 'error' }, e.message));
    }
  });
}

/** Runs one of convert/resize/merge/extract and shows what it printed. */
async function loraTool(btn, url, makeBody) {
  const out = $('#lora-result');
  const actions = $('#lora-result-actions');
  let body;
  try { body = makeBody(); } catch (e) { out.textContent = e.message; out.classList.add('error'); return; }
  out.classList.remove('error');
  out.textContent = 'Working…';
  actions.replaceChildren();
  await busy(btn, async () => {
    try {
      const r = await api('POST', url, body);
      out.textContent = (r && r.output) || 'Done.';
      if (body.output) {
        actions.replaceChildren(el('button', { type: 'button', class: 'small', onclick: () => inspectLora(body.output) }, `Inspect ${basename(body.output)}`));
      }
    } catch (e) {
      out.textContent = e.message;
      out.classList.add('error');
    }
  });
}

function needLoraPath() {
  const p = $('#lora-path').value.trim();
  if (!p) throw new Error('Choose the LoRA file at the top first.');
  return p;
}

/** The output name, or a sensible one written back into the field. */
function outputName(sel, suggestion) {
  const input = $(sel);
  if (!input.value.trim()) input.value = suggestion;
  return input.value.trim();
}

function wireLoraTools() {
  $('#conv-run').addEventListener('click', (e) => loraTool(e.currentTarget, '/api/lora/convert', () => {
    const input = needLoraPath();
    const to = $('#conv-to').value;
    return { input, output: outputName('#conv-output', `${stripExt(input)}-${to}.safetensors`), to };
  }));
  $('#resize-run').addEventListener('click', (e) => loraTool(e.currentTarget, '/api/lora/resize', () => {
    const input = needLoraPath();
    const rank = Number($('#resize-rank').value);
    if (!Number.isInteger(rank) || rank < 1) throw new Error('The new rank must be a whole number, 1 or more.');
    return { input, output: outputName('#resize-output', `${stripExt(input)}-rank${rank}.safetensors`), rank };
  }));
  $('#merge-run').addEventListener('click', (e) => loraTool(e.currentTarget, '/api/lora/merge', () => {
    const loras = $('#merge-loras').value.split('\n').map((l) => l.trim()).filter(Boolean).map((line) => {
      const m = /^(.*?)\s+(-?\d*\.?\d+)$/.exec(line); // "file.safetensors 0.7"
      return m ? { path: m[1], weight: Number(m[2]) } : { path: line, weight: 1.0 };
    });
    if (!loras.length) throw new Error('List the LoRA files to merge, one per line.');
    return { model: $('#lora-model').value.trim() || null, loras, output: outputName('#merge-output', 'merged.safetensors') };
  }));
  $('#extract-run').addEventListener('click', (e) => loraTool(e.currentTarget, '/api/lora/extract', () => {
    const base = $('#extract-base').value.trim();
    const tuned = $('#extract-tuned').value.trim();
    const rank = Number($('#extract-rank').value);
    if (!base || !tuned) throw new Error('Choose both the base model and the fine-tuned model.');
    if (!Number.isInteger(rank) || rank < 1) throw new Error('The rank must be a whole number, 1 or more.');
    return { base, tuned, rank, output: outputName('#extract-output', `extracted-rank${rank}.safetensors`) };
  }));
}

/* ════════════════════════════ start-up ════════════════════════════ */

/** The server set its cookie from ?token=; keep the token out of history and bookmarks. */
function stripToken() {
  const u = new URL(location.href);
  if (!u.searchParams.has('token')) return;
  u.searchParams.delete('token');
  history.replaceState(null, '', u.pathname + (u.search || '') + u.hash);
}

function wire() {
  for (const t of $$('.tab')) t.addEventListener('click', () => showView(t.dataset.view));
  $('#header-job').addEventListener('click', () => { if (job.id) showView(job.kind === 'generate' ? 'generate' : 'train'); });
  $('#gen-use-trained').addEventListener('click', useTrainedLora);
  wirePicker();

  // dataset
  wireBrowse('#ds-browse', '#ds-path', 'dir', 'Choose the folder with your training images');
  wireBrowse('#ds-class-browse', '#ds-class-path', 'dir', 'Choose the folder of class (regularisation) images');
  $('#ds-load').addEventListener('click', loadDataset);
  $('#ds-path').addEventListener('keydown', (e) => { if (e.key === 'Enter') loadDataset(); });
  $('#ds-use').addEventListener('click', useDataset);

  // train
  $('#train-form').addEventListener('submit', (e) => e.preventDefault());
  $('#preset-apply').addEventListener('click', applyPreset);
  wireBrowse('#cfg-browse', '#cfg-path', 'file', 'Choose a config file (.toml)');
  $('#cfg-load').addEventListener('click', loadConfigFile);
  $('#cfg-save').addEventListener('click', saveConfigFile);
  $('#cfg-reset').addEventListener('click', () => replaceConfig({}, 'Every setting is back to its default.'));
  $('#train-start').addEventListener('click', () => startTraining(false));
  $('#train-resume').addEventListener('click', () => startTraining(true));
  $('#train-stop').addEventListener('click', (e) => stopJob(e.currentTarget));
  $('#train-use-lora').addEventListener('click', useTrainedLora);
  $('#train-inspect-lora').addEventListener('click', () => { showView('lora'); inspectLora(job.loraFile); });
  $('#command-copy').addEventListener('click', async (e) => {
    try { await navigator.clipboard.writeText($('#command').textContent); e.target.textContent = 'Copied'; } catch (err) { e.target.textContent = 'Select and copy'; }
    setTimeout(() => { e.target.textContent = 'Copy'; }, 1500);
  });

  // generate
  $('#gen-form').addEventListener('submit', runGenerate);
  $('#gen-stop').addEventListener('click', (e) => stopJob(e.currentTarget));
  $('#gen-add-lora').addEventListener('click', () => $('#gen-loras').append(loraRow()));
  $('#gen-model').addEventListener('input', () => { state.genModelTouched = true; });
  wireBrowse('#gen-model-browse', '#gen-model', 'any', 'Choose the base model (a folder or a .safetensors file)');
  $('#gallery-refresh').addEventListener('click', loadGallery);

  // LoRA files
  wireBrowse('#lora-browse', '#lora-path', 'file', 'Choose a LoRA file');
  wireBrowse('#lora-model-browse', '#lora-model', 'any', 'Choose the base model');
  wireBrowse('#extract-base-browse', '#extract-base', 'any', 'Choose the base model');
  wireBrowse('#extract-tuned-browse', '#extract-tuned', 'any', 'Choose the fine-tuned model');
  $('#lora-inspect').addEventListener('click', () => inspectLora());
  $('#lora-path').addEventListener('keydown', (e) => { if (e.key === 'Enter') inspectLora(); });
  wireLoraTools();

  window.addEventListener('resize', drawChartSoon);
  // Back to the tab after a while: a run may have started or ended elsewhere.
  window.addEventListener('focus', () => { if (!job.es) refreshJob(); });
}

async function init() {
  stripToken();
  wire();
  $('#ds-path').value = storeGet('dsPath', '');
  $('#gen-loras').append(loraRow());
  const hash = location.hash.slice(1);
  showView(VIEWS.includes(hash) ? hash : 'dataset');
  renderJobNow();
  drawChartSoon();
  const jobLoaded = api('GET', '/api/job').then((js) => {
    attachJob(js);
    // Opened while something runs: show it, unless the address asked for a view.
    if (js && js.status === 'running' && !VIEWS.includes(hash)) showView(js.kind === 'generate' ? 'generate' : 'train');
  }).catch((e) => showErrors($('#global-error'), 'Could not ask the server about runs: ' + e.message));
  await Promise.all([loadInfo(), loadSchema(), jobLoaded]);
}

// For browser tests and the curious: the page's state (read-only use, please).
window.sdlora = { state, job, chart };

init();
