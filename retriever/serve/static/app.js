// retriever's search page: plain JS, no build step, talks to the /v1 API of the server that serves it.
'use strict';

const $ = (id) => document.getElementById(id);
const state = {
  index: '', modality: 'image', k: 24, min: -1, q: '', id: null, image: null,
  and: '', not: '', where: '', dedup: '', // the query language: added / subtracted text, filter, folding
};
const REFINE = ['and', 'not', 'where', 'dedup'];
let pending = null; // the query to retry after the API key is entered

function readControls() {
  state.index = $('index').value;
  state.modality = document.querySelector('input[name=modality]:checked').value;
  const k = parseInt($('k').value, 10);
  state.k = Number.isFinite(k) ? k : 24;
  state.min = parseFloat($('min').value);
  for (const key of REFINE) state[key] = $(key).value.trim();
}

function writeControls() {
  if (state.index) $('index').value = state.index;
  for (const r of document.querySelectorAll('input[name=modality]')) r.checked = r.value === state.modality;
  $('k').value = state.k;
  $('min').value = state.min;
  $('min-out').textContent = state.min <= -1 ? 'off' : state.min.toFixed(2);
  $('q').value = state.q;
  for (const key of REFINE) $(key).value = state[key];
}

function toUrl() {
  const p = new URLSearchParams();
  if (state.index) p.set('index', state.index);
  if (state.q) p.set('q', state.q);
  if (state.id !== null) p.set('id', String(state.id));
  p.set('modality', state.modality);
  p.set('k', String(state.k));
  if (state.min > -1) p.set('min', String(state.min));
  for (const key of REFINE) if (state[key]) p.set(key, state[key]);
  return '?' + p.toString();
}

function fromUrl() {
  const p = new URLSearchParams(location.search);
  state.index = p.get('index') || state.index;
  state.q = p.get('q') || '';
  state.id = p.has('id') ? parseInt(p.get('id'), 10) : null;
  state.modality = p.get('modality') === 'text' ? 'text' : 'image';
  state.k = parseInt(p.get('k') || '24', 10) || 24;
  state.min = p.has('min') ? parseFloat(p.get('min')) : -1;
  for (const key of REFINE) state[key] = p.get(key) || '';
  state.image = null;
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: 'same-origin', ...options });
  if (resp.status === 401) {
    const err = new Error('This server needs an API key.');
    err.needsKey = true;
    throw err;
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const fallback = { 413: 'The image is larger than this server accepts.', 404: 'Not found.' }[resp.status];
    throw new Error((body && body.error) || fallback || `The server answered ${resp.status}.`);
  }
  return body;
}

async function loadIndexes() {
  const data = await api('/v1/indexes');
  const sel = $('index');
  sel.replaceChildren();
  for (const ix of data.indexes) {
    const opt = document.createElement('option');
    opt.value = ix.name;
    opt.textContent = `${ix.name} (${ix.count.toLocaleString()})`;
    sel.append(opt);
  }
  $('k').max = String(data.max_k);
  let missing = '';
  if (!data.indexes.some((ix) => ix.name === state.index)) {
    const first = data.indexes.length ? data.indexes[0].name : '';
    if (state.index) missing = `This server has no index named ${state.index}; searching ${first} instead.`;
    state.index = first;
  }
  sel.value = state.index;
  return missing;
}

async function run(push) {
  readControls();
  if (push) history.pushState(null, '', toUrl());
  const hasQuery = state.q || state.id !== null || state.image;
  if (!hasQuery) { render(null); return; }
  showError('');
  $('status').textContent = 'Searching…';
  const common = { index: state.index, modality: state.modality, k: state.k };
  if (state.min > -1) common.min_score = state.min;
  if (state.where) common.where = state.where;
  if (state.dedup) common.dedup = Number(state.dedup);
  try {
    let result;
    if (state.image) {
      const form = new FormData();
      form.append('file', state.image, state.image.name || 'pasted-image');
      for (const [key, value] of Object.entries(common)) form.append(key, String(value));
      if (state.and) form.append('text', state.and);
      if (state.not) form.append('not_text', state.not);
      result = await api('/v1/search/image', { method: 'POST', body: form });
    } else {
      const body = state.id !== null ? { ...common, id: state.id } : { ...common, text: state.q };
      const terms = [];
      if (state.and) terms.push({ text: state.and });
      if (state.not) terms.push({ text: state.not, negative: true });
      if (terms.length) body.terms = terms;
      result = await api('/v1/search', {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
      });
    }
    render(result);
  } catch (e) {
    $('status').textContent = '';
    if (e.needsKey) { askForKey(() => run(false)); return; }
    showError(e.message);
  }
}

function describeQuery() {
  let what = `“${state.q}”`;
  if (state.image) what = 'your image';
  if (state.id !== null) what = `more like item ${state.id}`;
  if (state.and) what += ` and “${state.and}”`;
  if (state.not) what += ` but not “${state.not}”`;
  if (state.where) what += ` where ${state.where}`;
  return what;
}

function describeReport(report) {
  if (!report) return '';
  const parts = [];
  if (report.matching_rows !== null && report.matching_rows !== undefined) {
    parts.push(`${report.matching_rows.toLocaleString()} items match the filter`);
  }
  if (report.folded_duplicates) parts.push(`${report.folded_duplicates} duplicates folded`);
  return parts.length ? ` (${parts.join(', ')})` : '';
}

function showQueryImage() {
  // The query's own picture beside the "and / but not" fields: an upload, or the item of more-like-this.
  const thumb = $('query-thumb');
  if (state.image) {
    if (thumb.src.startsWith('blob:')) URL.revokeObjectURL(thumb.src);
    thumb.src = URL.createObjectURL(state.image);
  } else if (state.id !== null) {
    thumb.src = `/v1/indexes/${encodeURIComponent(state.index)}/items/${state.id}/thumbnail?size=128`;
  }
  $('query-words').textContent = state.image || state.id !== null ? describeQuery() : '';
  $('query-image').hidden = !(state.image || state.id !== null);
}

function render(result) {
  const list = $('results');
  list.replaceChildren();
  showQueryImage();
  if (!result) { $('status').textContent = ''; return; }
  const what = state.modality === 'text' ? 'captions' : 'images';
  $('status').textContent =
    `${result.hits.length} ${what} for ${describeQuery()} in ${result.took_ms.toFixed(0)} ms${describeReport(result.report)}`;
  for (const hit of result.hits) {
    const li = document.createElement('li');
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'hit';
    btn.dataset.id = String(hit.id);
    btn.title = 'More like this';
    const img = document.createElement('img');
    img.loading = 'lazy';
    img.decoding = 'async';
    img.src = `${hit.thumbnail_url}?size=256`;
    img.alt = hit.caption || (hit.metadata && hit.metadata.filename) || `item ${hit.id}`;
    const meta = document.createElement('span');
    meta.className = 'meta';
    const score = document.createElement('span');
    score.className = 'score';
    score.textContent = hit.score.toFixed(3);
    const caption = document.createElement('span');
    caption.className = 'caption';
    caption.textContent = hit.caption || (hit.metadata && hit.metadata.filename) || '';
    meta.append(score, caption);
    btn.append(img, meta);
    btn.addEventListener('click', () => moreLikeThis(hit.id));
    li.append(btn);
    list.append(li);
  }
}

function moreLikeThis(id) {
  state.id = id;
  state.q = '';
  state.image = null;
  $('q').value = '';
  run(true);
  window.scrollTo(0, 0);
}

function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith('image/')) { showError(`${file.name || 'That file'} is not an image.`); return; }
  state.image = file;
  state.q = '';
  state.id = null;
  $('q').value = '';
  history.pushState(null, '', toUrl()); // an uploaded image cannot live in the URL; the options can
  run(false);
}

function askForKey(retry) {
  pending = retry;
  $('key-form').hidden = false;
  $('key').focus();
}

async function unlock(event) {
  event.preventDefault();
  const key = $('key').value.trim();
  try {
    const resp = await fetch('/v1/session', { method: 'POST', headers: { Authorization: `Bearer ${key}` } });
    if (!resp.ok) { showError('That API key was not accepted.'); return; }
  } catch (e) { showError('The server cannot be reached.'); return; }
  $('key').value = '';
  $('key-form').hidden = true;
  showError('');
  await start();
  if (pending) { const retry = pending; pending = null; retry(); }
}

function wire() {
  $('search').addEventListener('submit', (e) => {
    e.preventDefault();
    state.q = $('q').value.trim();
    state.id = null;
    state.image = null;
    if (!state.q) { showError('Type something to search for, or give an image.'); return; }
    run(true);
  });
  $('file').addEventListener('change', (e) => { searchImage(e.target.files[0]); e.target.value = ''; });
  $('upload-label').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('file').click(); }
  });
  for (const el of [$('index'), $('k'), ...document.querySelectorAll('input[name=modality]')]) {
    el.addEventListener('change', () => run(true));
  }
  $('min').addEventListener('input', () => {
    const v = parseFloat($('min').value);
    $('min-out').textContent = v <= -1 ? 'off' : v.toFixed(2);
  });
  $('min').addEventListener('change', () => run(true));
  $('refine').addEventListener('submit', (e) => { e.preventDefault(); run(true); }); // Enter or the button
  $('key-form').addEventListener('submit', unlock);
  document.addEventListener('paste', (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith('image/'));
    if (file) { e.preventDefault(); searchImage(file); }
  });
  let depth = 0;
  document.addEventListener('dragenter', (e) => { e.preventDefault(); depth += 1; $('drop').hidden = false; });
  document.addEventListener('dragleave', () => { depth -= 1; if (depth <= 0) { depth = 0; $('drop').hidden = true; } });
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    depth = 0;
    $('drop').hidden = true;
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) searchImage(file); else showError('Drop an image file.');
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === '/' && document.activeElement !== $('q') && !(e.target instanceof HTMLInputElement)) {
      e.preventDefault();
      $('q').focus();
    }
  });
  window.addEventListener('popstate', () => { fromUrl(); writeControls(); run(false); });
}

async function start() {
  let missing = '';
  try {
    missing = await loadIndexes();
  } catch (e) {
    if (e.needsKey) { askForKey(null); return; }
    showError(e.message);
    return;
  }
  writeControls();
  await run(false);
  if (missing && $('error').hidden) showError(missing);
}

fromUrl();
wire();
start();
