// The playground: one prompt, up to two chat panels streaming side by side with
// stream_options.trimode_events; survives the server restarting (polls /health) and shows
// every server error as a message. Model text only ever goes through textContent.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const statusLine = $("#status");
const errorBox = $("#errors");
const server = { online: null, model: null };

function showError(text) {
  const item = document.createElement("p");
  item.className = "error";
  const msg = document.createElement("span");
  msg.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "Dismiss";
  close.setAttribute("aria-label", `Dismiss: ${text}`);
  close.addEventListener("click", () => { item.remove(); $("#prompt").focus(); });
  item.append(msg, " ", close);
  errorBox.append(item);
}

async function watchHealth() {
  // reconnects by itself: the page keeps working across server restarts
  for (;;) {
    let ok = false;
    try {
      ok = (await fetch("health", { cache: "no-store" })).ok;
      if (ok && !server.online) {
        const models = await (await fetch("v1/models", { cache: "no-store" })).json();
        server.model = models.data[0].id;
      }
    } catch (e) { ok = false; }
    if (ok !== server.online) {
      server.online = ok;
      document.body.dataset.online = ok ? "yes" : "no";
      statusLine.textContent = ok ? `connected · model ${server.model}`
        : "server unreachable · retrying every 2 s";
    }
    await sleep(2000);
  }
}

class Panel {
  constructor(section) {
    this.section = section;
    this.name = $("h2", section).textContent;
    section.append($("#panel-body").content.cloneNode(true));
    this.block = $(".block", section);
    this.chart = $(".chart", section);
    this.stats = $(".stats", section);
    this.chat = $(".chat", section);
    this.history = [];
    this.queue = [];
    this.controller = null;
    this.setState("idle");
  }

  field(name) { return $(`[name=${name}]`, this.section); }

  setState(state) { this.section.dataset.state = state; }

  body(prompt) {
    const body = {
      messages: [...this.history, { role: "user", content: prompt }],
      mode: this.field("mode").value, stream: true,
      stream_options: { trimode_events: true, include_usage: true },
    };
    for (const name of ["block_length", "threshold", "temperature", "max_tokens"]) {
      const raw = this.field(name).value.trim();
      if (raw !== "") body[name] = Number(raw);
    }
    return body;
  }

  bubble(role, text) {
    const li = document.createElement("li");
    li.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "you" : "model";
    const content = document.createElement("span");
    content.className = "text";
    content.textContent = text;
    li.append(who, content);
    this.chat.append(li);
    return content;
  }

  async run(prompt, pace) {
    this.bubble("user", prompt);
    const answer = this.bubble("assistant", "");
    this.controller = new AbortController();
    this.setState("running");
    this.stats.textContent = `${this.field("mode").value} · waiting for the first forward…`;
    this.current = { prompt, answer, done: false, chart: [], text: "" };
    const reading = this.read(this.body(prompt));
    await this.draw(pace);
    await reading;
    this.controller = null;
  }

  async read(body) {
    const push = (item) => this.queue.push(item);
    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body), signal: this.controller.signal,
      });
      if (!resp.ok) {
        let message = `HTTP ${resp.status}`;
        try { message = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
        push({ type: "error", message });
        return;
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of frame.split("\n")) {
            if (line.startsWith("data: ")) this.parse(line.slice(6), push);
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") push({ type: "stopped" });
      else push({ type: "lost" });
    } finally {
      push({ type: "end" });
    }
  }

  parse(data, push) {
    if (data === "[DONE]") return;
    const obj = JSON.parse(data);
    if (obj.error) push({ type: "error", message: obj.error.message });
    else if (obj.object === "trimode.forward") push({ type: "event", event: obj.trimode_event });
    else if (obj.choices && obj.choices.length) {
      const c = obj.choices[0];
      if (c.delta && c.delta.content) push({ type: "text", text: c.delta.content });
      if (c.finish_reason) push({ type: "finish", reason: c.finish_reason });
    }
  }

  async draw(pace) {
    const run = this.current;
    for (;;) {
      const item = this.queue.shift();
      if (!item) { await sleep(10); continue; }
      if (item.type === "event") {
        const e = item.event;
        run.chart.push({ committed: e.committed.length, tpf: e.tokens_per_forward });
        TrimodeView.drawBlock(this.block, e);
        TrimodeView.drawChart(this.chart, run.chart);
        this.stats.textContent = TrimodeView.statsText(e);
        if (pace() > 0) await sleep(pace());
      } else if (item.type === "text") {
        run.text += item.text;
        run.answer.textContent = run.text;
      } else if (item.type === "finish") {
        run.done = true;
        this.stats.textContent += ` · finish_reason ${item.reason}`;
      } else if (item.type === "error") {
        showError(`${this.name}: ${item.message}`);
        this.setState("error");
      } else if (item.type === "lost") {
        showError(`${this.name}: the connection to the server was lost (restarted?); ` +
          "the answer is incomplete. The page reconnects by itself; send again when it says connected.");
        this.setState("error");
      } else if (item.type === "stopped") {
        this.stats.textContent += " · stopped";
      } else if (item.type === "end") {
        if (run.done) {
          this.history.push({ role: "user", content: run.prompt },
            { role: "assistant", content: run.text });
          this.setState("done");
        } else if (this.section.dataset.state === "running") {
          this.setState("stopped");
        }
        if (!run.text) run.answer.parentNode.classList.add("empty");
        return;
      }
    }
  }

  stop() { if (this.controller) this.controller.abort(); }

  clear() {
    this.history = [];
    this.chat.replaceChildren();
    this.block.replaceChildren();
    this.chart.replaceChildren();
    this.stats.textContent = "idle";
    this.setState("idle");
  }
}

function main() {
  const panels = [...document.querySelectorAll(".panel")].map((s) => new Panel(s));
  panels[0].field("mode").value = "diffusion";
  panels[1].field("mode").value = "linear_spec";
  const form = $("#ask"), prompt = $("#prompt"), send = $("#send"), stop = $("#stop");
  const compare = $("#compare"), pace = () => Number($("#pace").value);
  const active = () => panels.filter((p) => !p.section.hidden);
  compare.addEventListener("change", () => { panels[1].section.hidden = !compare.checked; });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text) { showError("Write a prompt first."); prompt.focus(); return; }
    send.disabled = true;
    stop.disabled = false;
    document.body.dataset.busy = "yes";
    try {
      await Promise.all(active().map((p) => p.run(text, pace)));
    } finally {
      send.disabled = false;
      stop.disabled = true;
      document.body.dataset.busy = "no";
      if (document.activeElement === stop || document.activeElement === document.body) send.focus();
    }
  });
  stop.addEventListener("click", () => panels.forEach((p) => p.stop()));
  $("#clear").addEventListener("click", () => panels.forEach((p) => p.clear()));
  watchHealth();
}

main();
