// The try-it page: calls the service's own REST API (/v1/models, /classify, /embed); no framework, no build step.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { models: [], keyRequired: false };

  function headers() {
    const key = $("key").value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  async function apiError(response) {
    // The API's own message: {"error": {"code", "message"}} (or {"error": "..."}).
    try {
      const body = await response.json();
      const error = body.error;
      return typeof error === "string" ? error : (error && error.message) || response.statusText;
    } catch (e) {
      return response.status + " " + response.statusText;
    }
  }

  function askForKey(message) {
    state.keyRequired = true;
    $("key-field").hidden = false;
    $("key").focus();
    showError(message + " — enter an API key above.");
  }

  async function loadModels() {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      askForKey(await apiError(response));
      return;
    }
    if (!response.ok) {
      showError(await apiError(response));
      return;
    }
    showError("");
    state.models = (await response.json()).models;
    const select = $("model");
    const previous = select.value;
    select.innerHTML = "";
    for (const m of state.models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name + (m.default ? " (default)" : "");
      select.appendChild(option);
    }
    const keep = state.models.find((m) => m.name === previous) || state.models.find((m) => m.default);
    if (keep) select.value = keep.name;
    describeModel();
  }

  function currentModel() {
    return state.models.find((m) => m.name === $("model").value);
  }

  function runtimeText(runtime) {
    // /v1/models describes the runtime as {name, precision, reason}
    return typeof runtime === "string" ? runtime : runtime.name + " " + runtime.precision;
  }

  function describeModel() {
    const m = currentModel();
    if (!m) return;
    const task = $("task");
    task.querySelector('option[value="classify"]').disabled = !m.tasks.includes("classify");
    if (!m.tasks.includes("classify")) task.value = "embed";
    const parts = [
      m.architecture,
      "version " + m.version,
      m.num_labels ? m.num_labels + " labels" : "embedder (" + m.embedding_dim + "-d)",
      m.input_size.join("×") + " px",
      m.dtype + " on " + m.device,
    ];
    if (m.runtime) parts.push("runtime " + runtimeText(m.runtime));
    if (m.hub_id) parts.push(m.hub_id + "@" + (m.revision || "").slice(0, 12));
    $("model-info").textContent = parts.join(" · ");
  }

  function card(file, url) {
    const div = document.createElement("div");
    div.className = "result";
    const img = document.createElement("img");
    img.src = url;
    img.alt = file.name;
    const body = document.createElement("div");
    body.className = "body";
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = file.name;
    body.appendChild(name);
    div.append(img, body);
    return { div, body };
  }

  function bars(body, predictions) {
    for (const p of predictions) {
      const row = document.createElement("div");
      row.className = "pred";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = (100 * p.score).toFixed(1) + "%";
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = Math.max(0.5, 100 * p.score).toFixed(1) + "%";
      bar.appendChild(fill);
      row.append(label, score, bar);
      body.appendChild(row);
    }
  }

  function similarity(files, vectors) {
    const table = document.createElement("table");
    table.className = "sim";
    const head = table.insertRow();
    head.appendChild(document.createElement("th")).textContent = "cosine";
    files.forEach((f, i) => (head.appendChild(document.createElement("th")).textContent = "#" + (i + 1)));
    vectors.forEach((a, i) => {
      const row = table.insertRow();
      row.appendChild(document.createElement("th")).textContent = "#" + (i + 1) + " " + files[i].name;
      vectors.forEach((b) => {
        let dot = 0;
        for (let k = 0; k < a.length; k++) dot += a[k] * b[k];
        row.insertCell().textContent = dot.toFixed(3);
      });
    });
    return table;
  }

  async function run(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    const m = currentModel();
    if (!m) {
      await loadModels();
      if (!currentModel()) return;
    }
    showError("");
    const task = $("task").value;
    const form = new FormData();
    files.forEach((f) => form.append("file", f, f.name));
    const params = new URLSearchParams({ model: $("model").value });
    if (task === "classify") params.set("top_k", String(Math.min(Number($("topk").value) || 5, currentModel().num_labels)));
    else params.set("normalize", "true");
    $("status").textContent = "Running " + files.length + " image(s)…";
    const started = performance.now();
    let response;
    try {
      response = await fetch("/" + task + "?" + params, { method: "POST", body: form, headers: headers() });
    } catch (e) {
      $("status").textContent = "";
      showError("The service did not answer: " + e);
      return;
    }
    const latency = performance.now() - started;
    if (response.status === 401) {
      $("status").textContent = "";
      askForKey(await apiError(response));
      return;
    }
    if (!response.ok) {
      $("status").textContent = "";
      showError(await apiError(response));
      return;
    }
    const body = await response.json();
    const results = $("results");
    results.innerHTML = "";
    $("similarity").innerHTML = "";
    body.results.forEach((r, i) => {
      const { div, body: inner } = card(files[i], URL.createObjectURL(files[i]));
      if (task === "classify") bars(inner, r.predictions);
      else inner.appendChild(document.createTextNode("vector of " + r.embedding.length + " floats (" + body.pooling + ")"));
      results.appendChild(div);
    });
    if (task === "embed") $("similarity").appendChild(similarity(files, body.results.map((r) => r.embedding)));
    const runtime = currentModel() && currentModel().runtime ? " · runtime " + runtimeText(currentModel().runtime) : "";
    $("status").textContent =
      body.model + " v" + currentModel().version + runtime + " · " + files.length + " image(s) in " + latency.toFixed(0) + " ms";
    $("status").dataset.latencyMs = latency.toFixed(1);
  }

  $("files").addEventListener("change", (e) => {
    const files = Array.from(e.target.files);
    e.target.value = ""; // choosing the same file again runs it again
    run(files);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); run(e.dataTransfer.files); });
  $("model").addEventListener("change", describeModel);
  $("key").addEventListener("change", loadModels);
  loadModels();
})();
