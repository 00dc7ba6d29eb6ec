// The slide page of `wsi-ad view`: OpenSeadragon over the slide's deep-zoom pyramid (or its stored thumbnail when
// the slide file is missing), the heatmap / tissue / outline layers on the same level-0 geometry, and the hotspots.
// Everything it needs is in #slide-info (written by the server); window.wsiView exposes the state for tests.
"use strict";
(function () {
  const info = JSON.parse(document.getElementById("slide-info").textContent);
  const layers = {};
  // World (viewport) units: the base image is 1 unit wide. The layers span the slide's full level-0 width.
  let layerWidth = 1;
  let base = info.slide_dzi;
  if (!base && info.thumbnail) {
    base = {type: "image", url: info.thumbnail.url, buildPyramid: false};
    layerWidth = info.width / info.thumbnail.level0_width;
  } else if (!base) {
    base = info.layers.heatmap || info.layers.tissue || null;
  }
  const k = layerWidth / info.width;                // world units per level-0 pixel
  const state = {info, layers, k, ready: false, viewer: null, goToHotspot: null};
  window.wsiView = state;
  if (!base) return;

  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: document.querySelector("script[src*='openseadragon.min.js']").src.replace(/openseadragon\.min\.js.*$/, "images/"),
    tileSources: base,
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    animationTime: 0.6,
  });
  state.viewer = viewer;

  const checkbox = (id) => document.getElementById(id);
  const opacity = () => Number(checkbox("heatmap-opacity").value) / 100;
  const wanted = {
    tissue: () => (checkbox("show-tissue").checked ? 1 : 0),
    heatmap: () => (checkbox("show-heatmap").checked ? opacity() : 0),
    outlines: () => (checkbox("show-outlines").checked ? 1 : 0),
  };
  const refresh = () => Object.entries(layers).forEach(([name, item]) => item.setOpacity(wanted[name]()));

  viewer.addOnceHandler("open", () => {
    const order = ["tissue", "heatmap", "outlines"].filter((name) => info.layers[name] && info.layers[name] !== base);
    let pending = order.length;
    const done = () => { if (--pending <= 0) { refresh(); state.ready = true; } };
    if (!pending) state.ready = true;
    order.forEach((name) => viewer.addTiledImage({
      tileSource: info.layers[name], x: 0, y: 0, width: layerWidth, opacity: wanted[name](),
      success: (event) => { layers[name] = event.item; done(); },
      error: done,
    }));
  });
  ["show-heatmap", "heatmap-opacity", "show-tissue", "show-outlines"].forEach((id) => {
    checkbox(id).addEventListener("input", refresh);
    checkbox(id).addEventListener("change", refresh);
  });

  // Hotspots: zoom to a box 8 tiles wide around the hot tile, and outline the tile itself.
  const marker = document.createElement("div");
  marker.className = "hotspot-marker";
  state.goToHotspot = (index) => {
    const h = info.hotspots[index];
    const span = 8 * Math.max(h.width, h.height);
    viewer.viewport.fitBounds(new OpenSeadragon.Rect((h.centre_x - span / 2) * k, (h.centre_y - span / 2) * k,
                                                     span * k, span * k));
    viewer.removeOverlay(marker);
    viewer.addOverlay({element: marker, location: new OpenSeadragon.Rect(h.x * k, h.y * k, h.width * k, h.height * k)});
    document.querySelectorAll("button.hotspot").forEach((b) => b.classList.toggle("selected", Number(b.dataset.index) === index));
  };
  document.querySelectorAll("button.hotspot").forEach((button) => {
    button.addEventListener("click", () => state.goToHotspot(Number(button.dataset.index)));
  });
  const hideRim = document.getElementById("hide-rim");
  if (hideRim) {
    hideRim.addEventListener("change", () => document.querySelectorAll("li.rim-spot").forEach((li) => {
      li.hidden = hideRim.checked;
    }));
  }

  // Pointer position in level-0 pixels.
  const pointer = document.getElementById("pointer");
  new OpenSeadragon.MouseTracker({
    element: viewer.container,
    moveHandler: (event) => {
      const point = viewer.viewport.pointFromPixel(event.position);
      pointer.textContent = `pointer: x ${Math.round(point.x / k).toLocaleString()}, y ${Math.round(point.y / k).toLocaleString()} (level-0 px)`;
    },
  });
})();
