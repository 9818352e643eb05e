// histoscope viewer: OpenSeadragon over /dzi, overlays from /api. No network beyond this server.
// document.body.dataset.settled is "1" once every image in view is fully drawn and nothing
// is loading or moving (tests and scripts wait for it).
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const $ = (id) => document.getElementById(id);
  const state = { slide: null, info: null, tissue: null, grid: null, heatmaps: [], heatmapItem: null,
                  pending: 0, animating: false };

  function url(path, query) {
    const u = new URL(path, location.origin);
    for (const [k, v] of Object.entries(query || {})) u.searchParams.set(k, v);
    if (token) u.searchParams.set("token", token);
    return u.pathname + u.search;
  }
  async function api(path, query, options) {
    state.pending++; settle();
    try {
      const response = await fetch(url(path, query), options);
      const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
      if (!response.ok) throw new Error((body && body.detail) || response.statusText);
      return body;
    } finally { state.pending--; settle(); }
  }
  function status(text) { $("status").textContent = text || ""; }
  function esc(text) { const d = document.createElement("div"); d.textContent = String(text); return d.innerHTML; }

  const viewer = OpenSeadragon({
    element: $("viewer"), drawer: "canvas", showNavigationControl: false, showNavigator: true,
    navigatorPosition: "TOP_RIGHT", crossOriginPolicy: false, animationTime: 0.6, blendTime: 0,
    maxZoomPixelRatio: 2, visibilityRatio: 0.5, timeout: 60000,
  });
  window.hsViewer = viewer;

  function settle() {
    let ok = state.pending === 0 && !state.animating && viewer.world.getItemCount() > 0;
    for (let i = 0; ok && i < viewer.world.getItemCount(); i++) {
      if (!viewer.world.getItemAt(i).getFullyLoaded()) ok = false;
    }
    document.body.dataset.settled = ok ? "1" : "0";
  }
  viewer.addHandler("animation-start", () => { state.animating = true; settle(); });
  viewer.addHandler("animation-finish", () => { state.animating = false; settle(); });
  viewer.world.addHandler("add-item", (e) => { e.item.addHandler("fully-loaded-change", settle); settle(); });
  viewer.addHandler("update-viewport", draw);
  viewer.addHandler("tile-drawn", settle);
  viewer.addHandler("open-failed", (e) => status("cannot open: " + e.message));

  // ---- overlays drawn on a canvas above the viewer -----------------------------------------
  function draw() {
    const canvas = $("overlay"), ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (canvas.width !== width * ratio || canvas.height !== height * ratio) {
      canvas.width = width * ratio; canvas.height = height * ratio;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const image = viewer.world.getItemAt(0);
    if (!image) return;
    // Level-0 px -> canvas px is a scale and a shift (no rotation): computed once per frame, not per point.
    const o = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const scale = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(1e4, 0)).x / 1e4 - o.x / 1e4;
    const toScreen = (x, y) => ({ x: o.x + x * scale, y: o.y + y * scale });
    if ($("show-tissue").checked && state.tissue) {
      ctx.strokeStyle = "#00a000"; ctx.lineWidth = 2;
      for (const feature of state.tissue.features || []) {
        const geometry = feature.geometry || {};
        const polygons = geometry.type === "MultiPolygon" ? geometry.coordinates
                       : geometry.type === "Polygon" ? [geometry.coordinates] : [];
        ctx.beginPath();
        for (const polygon of polygons) for (const ring of polygon) {
          ring.forEach(([x, y], i) => { const p = toScreen(x, y); i ? ctx.lineTo(p.x, p.y) : ctx.moveTo(p.x, p.y); });
          ctx.closePath();
        }
        ctx.stroke();
      }
    }
    if ($("show-grid").checked && state.grid) {
      const size = state.grid.size_level0;
      const origin = toScreen(0, 0), edge = toScreen(size, 0);
      const px = edge.x - origin.x;
      if (px >= 3) {
        ctx.strokeStyle = "rgba(0, 0, 255, 0.6)"; ctx.lineWidth = 1; ctx.beginPath();
        for (const [x, y] of state.grid.coords) {
          const p = toScreen(x, y);
          if (p.x > width || p.y > height || p.x + px < 0 || p.y + px < 0) continue;
          ctx.rect(p.x, p.y, px, px);
        }
        ctx.stroke();
      }
    }
  }

  // ---- heatmap: an image placed over the slide in level-0 pixels ------------------------------
  function removeHeatmap() {
    if (state.heatmapItem) viewer.world.removeItem(state.heatmapItem);
    state.heatmapItem = null; settle();
  }
  function showHeatmap() {
    const chosen = state.heatmaps[$("heatmap-select").selectedIndex];
    const wanted = $("show-heatmap").checked && chosen && state.info;
    if (wanted) state.pending++;  // before removing the old one: never "settled" in between
    removeHeatmap();
    if (!wanted) return;
    const p = chosen.placement, W = state.info.width;
    viewer.addTiledImage({
      tileSource: { type: "image", url: url(chosen.url, { cmap: $("heatmap-cmap").value }), buildPyramid: false },
      x: p.x / W, y: p.y / W, width: p.width / W, opacity: Number($("heatmap-opacity").value),
      success: (e) => { state.heatmapItem = e.item; state.pending--; settle(); viewer.forceRedraw(); },
      error: (e) => { state.pending--; status("heatmap: " + e.message); settle(); },
    });
  }
  $("show-heatmap").addEventListener("change", showHeatmap);
  $("heatmap-select").addEventListener("change", () => { showHeatmap(); loadGallery(); });
  $("heatmap-cmap").addEventListener("change", showHeatmap);
  $("heatmap-opacity").addEventListener("input", () => {
    if (state.heatmapItem) state.heatmapItem.setOpacity(Number($("heatmap-opacity").value));
  });
  $("show-tissue").addEventListener("change", draw);
  $("show-grid").addEventListener("change", draw);

  // ---- side panels --------------------------------------------------------------------------
  async function loadGallery() {
    const gallery = $("gallery"); gallery.innerHTML = "";
    const chosen = state.heatmaps[$("heatmap-select").selectedIndex];
    if (!chosen) { gallery.textContent = "—"; return; }
    const tiles = await api(`/api/slides/${encodeURIComponent(state.slide)}/topk`, { run: chosen.run, score: chosen.score, k: 8 });
    for (const t of tiles) {
      const img = document.createElement("img");
      img.src = url(`/api/slides/${encodeURIComponent(state.slide)}/region.jpeg`, { x: t.x, y: t.y, size: Math.round(t.size), out: 128 });
      img.title = `#${t.rank} score ${t.score.toPrecision(3)} at (${t.x}, ${t.y})`;
      img.addEventListener("click", () => {
        const image = viewer.world.getItemAt(0);
        viewer.viewport.fitBounds(image.imageToViewportRectangle(t.x - t.size, t.y - t.size, 3 * t.size, 3 * t.size));
      });
      gallery.appendChild(img);
    }
  }

  async function openSlide(id) {
    state.slide = id; state.tissue = state.grid = null; state.heatmaps = []; state.heatmapItem = null;
    history_.length = 0;
    for (const li of $("slide-list").children) li.classList.toggle("active", li.dataset.id === id);
    const next = new URLSearchParams(location.search); next.set("slide", id);
    history.replaceState(null, "", "?" + next.toString());
    $("slide-title").textContent = id;
    const info = state.info = await api(`/api/slides/${encodeURIComponent(id)}`);
    $("slide-meta").textContent = info.error ? info.error
      : `${info.width} × ${info.height} px, ${info.mpp ? info.mpp.toFixed(4) + " µm/px" : "mpp unknown"}, ${info.backend}`;
    if (info.error) return;
    viewer.open(url(info.dzi));
    const id_ = encodeURIComponent(id);
    if (info.outputs.tissue) state.tissue = await api(`/api/slides/${id_}/tissue`);
    if (info.outputs.tiles) state.grid = await api(`/api/slides/${id_}/tiles`);
    state.heatmaps = await api(`/api/slides/${id_}/heatmaps`);
    $("heatmap-select").innerHTML = state.heatmaps.map((h) => `<option>${esc(h.run)} · ${esc(h.score)}</option>`).join("");
    $("predictions").innerHTML = Object.entries(info.predictions).map(([run, p]) =>
      `<div><b>${esc(run)}</b> (${esc(p.model)}): ${Object.entries(p.prediction).map(([k, v]) =>
        `${esc(k)} = ${esc(typeof v === "number" ? v.toPrecision(3) : v)}`).join(", ")}</div>`).join("");
    $("report").textContent = "—";
    if (info.outputs.report) $("report").textContent = (await api(`/api/slides/${id_}/report`)).report;
    $("chat-log").innerHTML = info.outputs.chat ? ""
      : '<div class="err">no chat model: start histoscope serve with --chat RUN</div>';
    $("chat-input").disabled = !info.outputs.chat;
    draw();
    if ($("show-heatmap").checked) showHeatmap();
    await loadGallery();
  }

  const history_ = [];
  $("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const question = $("chat-input").value.trim();
    if (!question || !state.slide) return;
    $("chat-input").value = "";
    $("chat-log").insertAdjacentHTML("beforeend", `<div class="q">${esc(question)}</div>`);
    try {
      const reply = await api(`/api/slides/${encodeURIComponent(state.slide)}/chat`, {}, {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ question, history: history_ }),
      });
      history_.push({ question, answer: reply.answer });
      $("chat-log").insertAdjacentHTML("beforeend", `<div>${esc(reply.answer)}</div>`);
    } catch (error) {
      $("chat-log").insertAdjacentHTML("beforeend", `<div class="err">${esc(error.message)}</div>`);
    }
  });

  async function loadList() {
    const slides = await api("/api/slides");
    const list = $("slide-list");
    list.innerHTML = "";
    for (const s of slides) {
      const li = document.createElement("li");
      li.dataset.id = s.slide_id;
      if (!s.error) {
        const img = document.createElement("img");
        img.loading = "lazy"; img.alt = "";
        img.src = url(`/api/slides/${encodeURIComponent(s.slide_id)}/thumbnail.jpeg`);
        li.appendChild(img);
      }
      li.appendChild(document.createTextNode(s.slide_id));
      if (s.error) { li.classList.add("error"); li.title = s.error; }
      li.addEventListener("click", () => openSlide(s.slide_id).catch((e) => status(e.message)));
      list.appendChild(li);
    }
    $("search").addEventListener("input", () => {
      const q = $("search").value.toLowerCase();
      for (const li of list.children) li.style.display = li.dataset.id.toLowerCase().includes(q) ? "" : "none";
    });
    const wanted = params.get("slide") || (slides[0] && slides[0].slide_id);
    if (wanted) await openSlide(wanted);
  }
  loadList().catch((e) => status(e.message));
})();
