// The clinician's page: send DICOM files to POST /v1/score?images=true with the API token
// and show the result in words, the scan and its heat map. Everything the server sends is
// put on the page as text (textContent) or as a PNG data URL, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const tokenInput = $("token");
  const fileInput = $("file");
  const drop = $("drop");
  const statusLine = $("status");
  const errorBox = $("error");
  const results = $("results");
  const modelLine = $("model");
  const maxMb = parseFloat(document.body.dataset.maxUploadMb || "0");
  const TOKEN_KEY = "eyehub-api-token";

  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";

  function headers() {
    const token = tokenInput.value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function percent(p) {
    return p === null || p === undefined ? "" : Math.round(p * 100) + "%";
  }

  function modelWords(m) {
    let words = m.name;
    if (m.version) words += " version " + m.version;
    if (m.alias) words += " (alias " + m.alias + ")";
    return words;
  }

  // -- errors in words ------------------------------------------------------------------

  function showError(title, detail) {
    errorBox.replaceChildren(el("strong", {}, title), detail ? el("span", {}, detail) : null);
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.replaceChildren();
  }

  async function errorFrom(response) {
    let body = {};
    try {
      body = await response.json();
    } catch (e) {
      body = {};
    }
    const detail = body.detail || "";
    switch (response.status) {
      case 400:
        return ["The file was refused: it is not a scan this model can score (" +
          (body.error || "bad request") + ").", detail];
      case 401:
        return ["The API token is missing or wrong.",
          "Enter the token you were given in the field above and send the file again."];
      case 413:
        return ["The file is too large for this service (the limit is " + maxMb + " MB).",
          detail];
      case 503:
        return ["The model is not loaded yet. Try again in a moment.", detail];
      default:
        return ["The service could not score the file (HTTP " + response.status + ").",
          detail + (response.headers.get("X-Request-ID") ?
            " Request id: " + response.headers.get("X-Request-ID") + "." : "")];
    }
  }

  // -- the model --------------------------------------------------------------------------

  async function loadModel() {
    try {
      const response = await fetch("/v1/model", { headers: headers() });
      if (response.status === 401) {
        modelLine.textContent = tokenInput.value.trim() ?
          "Model: the API token is not the service's." :
          "Model: enter the API token to see which model scores.";
        return;
      }
      if (!response.ok) {
        modelLine.textContent = "Model: not loaded yet (HTTP " + response.status + ").";
        return;
      }
      const m = await response.json();
      modelLine.replaceChildren("Model: ", el("strong", { id: "model-name" }, modelWords(m)),
        ", scores " + (m.input === "fusion" ? "a fundus photograph with an OCT" :
          m.input === "oct" ? "OCT volumes" : "fundus photographs") + ".");
    } catch (e) {
      modelLine.textContent = "Model: the service cannot be reached.";
    }
  }

  let tokenTimer = null;
  tokenInput.addEventListener("input", () => {
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
    clearTimeout(tokenTimer);
    tokenTimer = setTimeout(loadModel, 300);
  });

  // -- scoring ----------------------------------------------------------------------------

  async function score(files) {
    if (!files.length) return;
    clearError();
    results.replaceChildren();
    const total = files.reduce((sum, f) => sum + f.size, 0);
    if (maxMb > 0 && total > maxMb * 1048576) {
      showError("The file is too large for this service (the limit is " + maxMb + " MB).",
        "Its size is " + (total / 1048576).toFixed(1) + " MB.");
      return;
    }
    const form = new FormData();
    for (const f of files) form.append("file", f, "scan.dcm");
    const names = files.length === 1 ? "the file" : files.length + " files";
    statusLine.textContent = "Scoring " + names + "…";
    results.setAttribute("aria-busy", "true");
    const started = performance.now();
    let response;
    try {
      response = await fetch("/v1/score?images=true", {
        method: "POST", headers: headers(), body: form,
      });
    } catch (e) {
      statusLine.textContent = "";
      results.removeAttribute("aria-busy");
      showError("The service could not be reached.", String(e));
      return;
    }
    results.removeAttribute("aria-busy");
    if (!response.ok) {
      statusLine.textContent = "";
      const [title, detail] = await errorFrom(response);
      showError(title, detail);
      return;
    }
    const exams = await response.json();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    statusLine.textContent = "Scored " + exams.length + " exam" +
      (exams.length === 1 ? "" : "s") + " in " + seconds + " s.";
    for (const exam of exams) results.append(renderExam(exam));
    loadModel();
  }

  function renderExam(exam) {
    const card = el("article", { class: "exam", "data-decision": exam.decision });
    card.append(el("p", { class: "headline " + exam.decision }, exam.headline));
    const eye = exam.eye === "R" ? "right eye" : exam.eye === "L" ? "left eye" : "eye unknown";
    card.append(el("p", { class: "meta" },
      "Scored by ", el("strong", { class: "model-version" }, modelWords(exam.model)),
      " · " + eye + " · scan ", el("code", {}, exam.scan)));

    if (exam.status === "ungradable") {
      card.append(el("div", { class: "ungradable-note" },
        el("strong", {}, "This scan is ungradable: "), exam.reason_text || exam.reason,
        ". No risk figures are given. Repeat the scan."));
    }
    const taskNames = {};
    for (const t of exam.tasks) taskNames[t.task] = t.description;
    const images = el("div", { class: "images" });
    for (const image of exam.images) {
      const what = image.modality === "oct" ?
        "OCT B-scan " + ((image.heatmap && image.heatmap.bscan !== null &&
          image.heatmap.bscan !== undefined ? image.heatmap.bscan :
          Math.floor(image.shape[0] / 2)) + 1) + " of " + image.shape[0] :
        "Fundus photograph";
      if (image.display_png) {
        images.append(el("figure", {},
          el("img", { src: "data:image/png;base64," + image.display_png, alt: what,
            class: "scan-image" }),
          el("figcaption", {}, what + " (" + (image.eye === "R" ? "right" : "left") +
            " eye)")));
      }
      if (image.overlay_png) {
        const task = image.heatmap ? (taskNames[image.heatmap.task] || image.heatmap.task) : "";
        images.append(el("figure", {},
          el("img", { src: "data:image/png;base64," + image.overlay_png,
            alt: "Heat map over the " + what.toLowerCase(), class: "heatmap-image" }),
          el("figcaption", {}, "Heat map: where the image drove the risk of " + task +
            " (red: most)")));
      }
    }
    card.append(images);
    if (exam.tasks.length) card.append(renderTasks(exam.tasks));
    return card;
  }

  function renderTasks(tasks) {
    const body = el("tbody");
    for (const t of tasks) {
      let result = "";
      if (t.kind === "regression") {
        result = (t.value === null || t.value === undefined ? "" : t.value.toFixed(1)) +
          " " + (t.unit || "");
      } else if (t.decision === undefined && t.unit && t.unit.startsWith("probability")) {
        result = percent(t.value) + " " + t.unit;
      } else if (t.grade !== undefined) {
        result = "grade " + t.grade + "; risk " + percent(t.probability);
      } else {
        result = "risk " + percent(t.probability);
      }
      const decision = t.decision ?
        el("span", { class: "decision " + t.decision }, t.decision === "refer" ? "refer" : "routine") :
        el("span", { class: "decision none" }, "not a referral finding");
      body.append(el("tr", { "data-task": t.task },
        el("td", {}, t.description),
        el("td", { class: "num" }, result),
        el("td", {}, decision),
        el("td", { class: "num" }, t.threshold === undefined ? "" : percent(t.threshold))));
    }
    return el("table", {},
      el("thead", {}, el("tr", {},
        el("th", {}, "Finding"), el("th", {}, "Result"), el("th", {}, "Decision"),
        el("th", {}, "Referral threshold"))),
      body);
  }

  // -- picking and dropping files -----------------------------------------------------------

  fileInput.addEventListener("change", () => {
    score(Array.from(fileInput.files || []));
    fileInput.value = "";
  });
  drop.addEventListener("click", (event) => {
    if (event.target !== fileInput && event.target.tagName !== "LABEL") fileInput.click();
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      fileInput.click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    score(Array.from((event.dataTransfer && event.dataTransfer.files) || []));
  });

  loadModel();
})();
