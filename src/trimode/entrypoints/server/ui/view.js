// Drawing of one panel: the current block (cells), the tokens-per-forward chart, the stats.
// Model text only ever goes through textContent, never parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function forwardColour(forward) {
  // neighbouring forwards get distant hues (golden angle)
  return `hsl(${Math.round((forward * 137.508) % 360)} 62% 80%)`;
}

function visible(text) {
  // newlines, tabs and bare spaces would leave a cell looking empty
  const shown = text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
  return shown.trim() === "" ? shown.replace(/ /g, "\u2423") : shown;
}

function cell(slot) {
  const el = document.createElement("span");
  el.className = `cell ${slot.state}`;
  el.dataset.position = slot.position;
  if (slot.state === "masked" || slot.token === null) {
    el.textContent = slot.state === "masked" ? "·" : "";
  } else {
    el.textContent = visible(slot.text);
  }
  if (slot.state === "committed" && slot.forward !== null) {
    el.style.background = forwardColour(slot.forward);
    el.title = `committed, decided by forward ${slot.forward}`;
  } else if (slot.state === "provisional") {
    el.title = `provisional (forward ${slot.forward})`;
  } else {
    el.title = slot.state;
  }
  if (slot.rejected) {
    const s = document.createElement("s");
    s.className = "rej";
    s.textContent = visible(slot.rejected.text);
    s.title = "rejected draft";
    el.appendChild(s);
  }
  return el;
}

function drawBlock(container, event) {
  const cells = event.block.slots.map(cell);
  container.replaceChildren(...cells);
  container.setAttribute("aria-label",
    `current block from position ${event.block.start}: ${event.block.slots.length} slots`);
}

function drawChart(svg, history) {
  // history: [{committed, tpf}] one per forward
  // drawn in the element's own pixels, so bars start at the left edge whatever its width
  const box = svg.getBoundingClientRect();
  const w = Math.max(Math.round(box.width) || 300, 100), h = Math.round(box.height) || 60;
  const n = Math.max(history.length, 40);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const top = Math.max(4, ...history.map((p) => p.committed));
  const bw = w / n;
  const nodes = [];
  history.forEach((p, i) => {
    const r = document.createElementNS(SVG, "rect");
    const bh = (p.committed / top) * (h - 4);
    r.setAttribute("x", (i * bw).toFixed(2));
    r.setAttribute("y", (h - bh).toFixed(2));
    r.setAttribute("width", Math.max(bw - 1, 0.5).toFixed(2));
    r.setAttribute("height", bh.toFixed(2));
    r.setAttribute("class", "bar");
    nodes.push(r);
  });
  if (history.length) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", history.map((p, i) =>
      `${((i + 0.5) * bw).toFixed(2)},${(h - (p.tpf / top) * (h - 4)).toFixed(2)}`).join(" "));
    line.setAttribute("class", "tpf");
    nodes.push(line);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", "4");
    label.setAttribute("y", "12");
    label.textContent = `tokens/forward ${history[history.length - 1].tpf.toFixed(2)}`;
    nodes.push(label);
  }
  svg.replaceChildren(...nodes);
}

function statsText(event, extra) {
  const parts = [event.mode, `forward ${event.forward} (${event.kind})`,
    `${event.generated_tokens} tokens`, `${event.tokens_per_forward.toFixed(2)} tokens/forward`];
  if (event.acceptance_length !== null) {
    parts.push(`acceptance_length ${event.acceptance_length.toFixed(2)}`);
  }
  if (extra) parts.push(extra);
  return parts.join(" · ");
}

window.TrimodeView = { drawBlock, drawChart, statsText, forwardColour };
