// The playground: plain JavaScript over the service's own API (no build step, no framework).
// Each view sends one request, shows its result, and the curl and Python lines that send it.
"use strict";

const $ = (id) => document.getElementById(id);
const ORIGIN = window.location.origin;
let models = [];

// --- the API ---------------------------------------------------------------------------------

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const response = await fetch(path, {method, headers: headers(),
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch (e) { /* not JSON: shown as text */ }
  if (!response.ok) {
    const message = json && json.error ? json.error.message : text;
    throw new Error(`${response.status}: ${message}`);
  }
  return json;
}

// --- the curl and Python lines of a request ------------------------------------------------

function shortened(value) {  // a data URI of a file is shown by its start only
  if (typeof value === "string" && value.startsWith("data:") && value.length > 80) {
    return value.slice(0, 48) + "...";
  }
  if (Array.isArray(value)) return value.map(shortened);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, shortened(v)]));
  }
  return value;
}

function python(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return "[" + value.map(python).join(", ") + "]";
  if (typeof value === "object") {
    return "{" + Object.entries(value).map(([k, v]) => JSON.stringify(k) + ": " + python(v))
      .join(", ") + "}";
  }
  return JSON.stringify(value);
}

function showSnippets(section, path, body) {
  const shown = shortened(body);
  const keyed = $("key").value.trim() !== "";
  const json = JSON.stringify(shown, null, 2).replace(/'/g, "'\\''");
  const curl = `curl -s ${ORIGIN}${path} \\\n  -H 'Content-Type: application/json' \\\n` +
    (keyed ? `  -H "Authorization: Bearer $API_KEY" \\\n` : "") + `  -d '${json}'`;
  const py = "import " + (keyed ? "os, " : "") + "requests\n\n" +
    `response = requests.post("${ORIGIN}${path}",\n` +
    `    json={\n${Object.entries(shown).map(([k, v]) => `        ${JSON.stringify(k)}: ${python(v)},\n`).join("")}    }` +
    (keyed ? `,\n    headers={"Authorization": f"Bearer {os.environ['API_KEY']}"}` : "") +
    ")\nprint(response.json())";
  const box = section.querySelector(".snippets");
  box.replaceChildren();
  for (const [title, text] of [["curl", curl], ["Python", py]]) {
    const h = document.createElement("h3");
    h.textContent = title;
    const pre = document.createElement("pre");
    pre.className = "snippet-" + title.toLowerCase();
    pre.textContent = text;
    box.append(h, pre);
  }
}

// --- models ----------------------------------------------------------------------------------

function model() {
  return models.find((m) => m.id === $("model").value);
}

function describe(m) {
  const parts = [`can: ${m.capabilities.join(", ")}`,
                 `window: ${m.window === null ? "n/a" : m.window + " tokens"}`,
                 `dimensions: ${m.dimensions === null ? "n/a" : m.dimensions}`,
                 `${m.dtype}${m.runtime ? " on " + m.runtime : ""}, ${m.device}`];
  const prompts = Object.entries(m.prompts);
  if (prompts.length) {
    parts.push("prompts: " + prompts.map(([name, text]) => `${name} = "${text}"`).join("; ") +
               (m.default_prompt_name ? ` (default: ${m.default_prompt_name})` : ""));
  }
  return parts.join(" · ");
}

function fillPrompts(select, m) {
  select.replaceChildren(new Option("(model default)", ""));
  for (const name of Object.keys(m.prompts)) select.append(new Option(name, name));
}

function mediaOf(m) {  // an image model takes images beside texts, an audio model (CLAP) clips
  const can = new Set(m.capabilities);
  return can.has("image_embed") ? "image" : can.has("audio_embed") ? "audio" : null;
}

function modelChanged() {
  const m = model();
  if (!m) return;
  $("model-info").textContent = describe(m);
  fillPrompts($("embed-prompt"), m);
  fillPrompts($("tokenize-prompt"), m);
  const can = new Set(m.capabilities);
  const media = mediaOf(m);
  $("media").hidden = media === null;
  if (media) {
    $("media-urls-label").textContent = media === "image" ? "Image URLs" : "Audio URLs";
    $("media-files-label").textContent = `${media} files`;
    $("embed-files").accept = `${media}/*`;
  }
  // sparse vectors and multi-vectors where the model has them
  $("embed-kind-label").hidden = !can.has("sparse_embed") && !can.has("multi_embed");
  for (const [value, capability] of [["sparse", "sparse_embed"], ["multi", "multi_embed"]]) {
    $("embed-kind").querySelector(`option[value=${value}]`).disabled = !can.has(capability);
  }
  if ($("embed-kind").selectedOptions[0].disabled) $("embed-kind").value = "dense";
  $("embed-kind").querySelector("option[value=dense]").disabled = !can.has("embed");
  if (!can.has("embed") && $("embed-kind").value === "dense") {
    $("embed-kind").value = can.has("sparse_embed") ? "sparse" : "multi";
  }
  const available = {embed: can.has("embed") || media !== null, rerank: can.has("rerank"),
                     tokenize: m.window !== null};
  for (const button of document.querySelectorAll("#tabs button")) {
    button.disabled = !available[button.dataset.tab];
    button.title = button.disabled ? `${m.id} cannot do this` : "";
  }
  const active = document.querySelector("#tabs button.active");
  if (active.disabled) {
    const first = [...document.querySelectorAll("#tabs button")].find((b) => !b.disabled);
    if (first) select(first.dataset.tab);
  }
}

async function loadModels() {
  const error = document.querySelector("#model-bar .error") || document.createElement("div");
  error.className = "error";
  $("model-bar").append(error);
  try {
    models = (await api("GET", "/v1/models")).data;
    error.hidden = true;
  } catch (e) {
    error.textContent = e.message + (e.message.startsWith("401") ? " (enter the API key above)" : "");
    error.hidden = false;
    return;
  }
  const current = $("model").value;
  $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (models.some((m) => m.id === current)) $("model").value = current;
  modelChanged();
}

function select(tab) {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  for (const section of document.querySelectorAll(".tab")) {
    section.classList.toggle("active", section.id === tab);
  }
}

// --- running a view --------------------------------------------------------------------------

async function run(section, path, body, show) {
  const error = section.querySelector(".error");
  const out = section.querySelector(".out");
  error.hidden = true;
  out.classList.add("busy");
  showSnippets(section, path, body);
  try {
    show(await api("POST", path, body), out);
    out.dataset.done = String(Number(out.dataset.done || 0) + 1);
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    out.replaceChildren();
  } finally {
    out.classList.remove("busy");
  }
}

function lines(id) {
  return $(id).value.split("\n").map((s) => s.trim()).filter((s) => s !== "");
}

function fileAsDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// --- embed & similarity ----------------------------------------------------------------------

function numbers(vector, dtype) {
  if (dtype !== "binary" && dtype !== "ubinary") return vector;
  const bits = [];  // packed bits (binary: as signed bytes): +1 / -1 each
  for (const byte of vector) {
    const b = byte & 0xff;
    for (let i = 7; i >= 0; i--) bits.push((b >> i) & 1 ? 1 : -1);
  }
  return bits;
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

function sparseDot(a, b) {  // {indices, values} each: SPLADE's score
  const weights = new Map(a.indices.map((index, i) => [index, a.values[i]]));
  let dot = 0;
  b.indices.forEach((index, i) => { dot += (weights.get(index) || 0) * b.values[i]; });
  return dot;
}

function maxSim(query, document) {  // ColBERT's: each query row's best match, averaged
  let total = 0;
  for (const q of query) {
    let best = -Infinity;
    for (const d of document) {
      let dot = 0;
      for (let i = 0; i < q.length; i++) dot += q[i] * d[i];
      best = Math.max(best, dot);
    }
    total += best;
  }
  return total / query.length;
}

function heat(value, scale = 1) {  // -scale blue, 0 white, +scale red
  const v = Math.max(-1, Math.min(1, value / (scale || 1)));
  const fade = Math.round(255 * (1 - Math.abs(v)));
  return v >= 0 ? `rgb(255, ${fade}, ${fade})` : `rgb(${fade}, ${fade}, 255)`;
}

async function embed() {
  const m = model();
  const texts = lines("embed-texts");
  const kindOfMedia = mediaOf(m);  // "image", "audio", or null (a text model)
  const media = kindOfMedia ? lines("embed-media") : [];
  if (kindOfMedia) {
    for (const file of $("embed-files").files) media.push(await fileAsDataUri(file));
  }
  let files = 0;
  const labels = [...texts, ...media.map((src) => src.startsWith("data:")
    ? `${kindOfMedia} file ${++files}` : src)];
  const body = {model: m.id, encoding_format: "float"};
  body.input = media.length  // Jina's items: texts and images (or clips) in one space
    ? [...texts.map((text) => ({text})), ...media.map((src) => ({[kindOfMedia]: src}))] : texts;
  const option = (id, name, convert = (v) => v) => {
    const value = $(id).value.trim();
    if (value !== "") body[name] = convert(value);
  };
  option("embed-prompt", "prompt_name");
  option("embed-input-type", "input_type");
  option("embed-dimensions", "dimensions", Number);
  option("embed-truncate", "truncate");
  const dtype = $("embed-dtype").value;
  if (dtype !== "float") body.output_dtype = dtype;
  if (!$("embed-normalized").checked) body.normalized = false;
  const kind = $("embed-kind-label").hidden ? "dense" : $("embed-kind").value;
  if (kind === "sparse") Object.assign(body, {return_sparse: true, sparse_tokens: true});
  if (kind === "multi") body.return_multivector = true;
  await run($("embed"), "/v1/embeddings", body, (result, out) => {
    let measure, what, size;
    if (kind === "sparse") {
      const vectors = result.data.map((d) => d.sparse_embedding);
      measure = (i, j) => sparseDot(vectors[i], vectors[j]);
      what = "sparse vectors; their dot products (SPLADE's score)";
      size = vectors.length;
    } else if (kind === "multi") {
      const vectors = result.data.map((d) => d.embedding.map((row) => numbers(row, dtype)));
      measure = (i, j) => maxSim(vectors[i], vectors[j]);
      what = `multi-vectors (${vectors.map((v) => v.length).join(", ")} rows); MaxSim of each ` +
        "row's text (as the query) against each column's, over the query's rows";
      size = vectors.length;
    } else {
      const vectors = result.data.map((d) => numbers(d.embedding, dtype));
      measure = (i, j) => cosine(vectors[i], vectors[j]);
      what = `${vectors.length} vectors of ${result.data[0].embedding.length} ${dtype} values; ` +
        "cosine similarity between each pair" + (dtype.endsWith("binary") ? " (bits as +1 / -1)" : "");
      size = vectors.length;
    }
    const values = [...Array(size)].map((_, i) => [...Array(size)].map((_, j) => measure(i, j)));
    const scale = kind === "dense" ? 1 : Math.max(...values.flat().map(Math.abs));
    const table = document.createElement("table");
    table.className = "heatmap";
    const head = table.insertRow();
    head.insertCell().textContent = "";
    labels.forEach((label, j) => {
      const th = document.createElement("th");
      th.textContent = j + 1;
      th.title = label;
      head.append(th);
    });
    values.forEach((row_values, i) => {
      const row = table.insertRow();
      const th = document.createElement("th");
      th.textContent = `${i + 1}. ${labels[i]}`;
      th.className = "label";
      row.append(th);
      row_values.forEach((value, j) => {
        const cell = row.insertCell();
        cell.textContent = value.toFixed(3);
        cell.dataset.value = String(value);
        cell.style.background = heat(value, scale);
        cell.title = `(${i + 1}, ${j + 1}) = ${value}`;
      });
    });
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = `${what}; ${result.usage.prompt_tokens} tokens`;
    const shown = [table, note];
    if (kind === "sparse") {  // each text's heaviest terms
      const terms = document.createElement("ol");
      terms.className = "terms";
      result.data.forEach((d, i) => {
        const top = d.sparse_embedding.values.map((v, k) => [v, d.sparse_embedding.tokens[k]])
          .sort((a, b) => b[0] - a[0]).slice(0, 8);
        const item = document.createElement("li");
        item.textContent = `${labels[i]}: ` +
          top.map(([v, token]) => `${token} ${v.toFixed(2)}`).join(", ");
        terms.append(item);
      });
      shown.push(terms);
    }
    out.replaceChildren(...shown);
  });
}

// --- rerank ----------------------------------------------------------------------------------

async function rerank() {
  const body = {model: model().id, query: $("rerank-query").value, documents: lines("rerank-docs"),
                return_documents: true};
  const topN = $("rerank-top-n").value.trim();
  if (topN !== "") body.top_n = Number(topN);
  if ($("rerank-raw").checked) body.raw_scores = true;
  await run($("rerank"), "/v1/rerank", body, (result, out) => {
    const scores = result.results.map((r) => r.relevance_score);
    // probabilities on their own 0-1 scale; raw scores from the lowest to the highest
    const bounded = scores.every((s) => s >= 0 && s <= 1);
    const low = bounded ? 0 : Math.min(...scores), high = bounded ? 1 : Math.max(...scores);
    const list = document.createElement("ol");
    list.className = "bars";
    for (const r of result.results) {
      const item = document.createElement("li");
      item.dataset.index = String(r.index);
      item.dataset.score = String(r.relevance_score);
      const bar = document.createElement("div");
      bar.className = "bar";
      const share = high > low ? (r.relevance_score - low) / (high - low) : 1;
      bar.style.width = `${Math.max(1, 100 * share)}%`;
      const label = document.createElement("span");
      label.className = "bar-label";
      const text = r.document ? r.document.text : body.documents[r.index];
      label.textContent = `${r.relevance_score.toFixed(4)}  #${r.index}  ${text}`;
      item.append(bar, label);
      list.append(item);
    }
    out.replaceChildren(list);
  });
}

// --- tokenize --------------------------------------------------------------------------------

async function tokenize() {
  const text = $("tokenize-text").value;
  const body = {model: model().id, input: text};
  if ($("tokenize-prompt").value) body.prompt_name = $("tokenize-prompt").value;
  if (!$("tokenize-special").checked) body.add_special_tokens = false;
  await run($("tokenize"), "/v1/tokenize", body, (result, out) => {
    const item = result.data[0];
    const shown = document.createElement("div");
    shown.className = "tokens";
    const chip = (token, id, kind) => {
      const span = document.createElement("span");
      span.className = "token " + kind;
      span.textContent = token;
      span.dataset.id = String(id);
      span.title = `${token} (id ${id})`;
      return span;
    };
    let at = 0, n = 0;
    item.tokens.forEach((token, i) => {
      const offset = item.offsets[i];
      if (offset === null) {  // special and prompt tokens: not in the text
        shown.append(chip(token, item.ids[i], "special"));
        return;
      }
      const [start, end] = offset;
      if (start > at) shown.append(document.createTextNode(text.slice(at, start)));
      const span = chip(text.slice(start, end), item.ids[i], `piece c${n++ % 4}`);
      span.dataset.token = token;
      span.title = `${token} (id ${item.ids[i]})`;
      shown.append(span);
      at = Math.max(at, end);
    });
    if (at < text.length) shown.append(document.createTextNode(text.slice(at)));
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = `${item.count} tokens` +
      (result.window ? ` of the model's window of ${result.window}` : "") +
      "; hover a token for its id";
    out.replaceChildren(shown, note);
  });
}

// --- wiring ----------------------------------------------------------------------------------

$("key").value = sessionStorage.getItem("api-key") || "";
$("key").addEventListener("change", () => {
  sessionStorage.setItem("api-key", $("key").value);  // this tab only; never sent but as a header
  loadModels();
});
$("model").addEventListener("change", modelChanged);
for (const button of document.querySelectorAll("#tabs button")) {
  button.addEventListener("click", () => select(button.dataset.tab));
}
$("embed-run").addEventListener("click", embed);
$("rerank-run").addEventListener("click", rerank);
$("tokenize-run").addEventListener("click", tokenize);
loadModels();
