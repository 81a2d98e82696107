// The llm_magic chat page: talks to this host's /v1/chat/completions with fetch (a POST that
// streams: quick tunnels buffer GET event streams) and keeps everything in localStorage.
// A thinking model's reasoning (delta.reasoning_content) streams into a block of its own above
// the answer, which folds away when the answer starts.
// Model output goes through marked, then DOMPurify, before it touches the page; user text is
// only ever set as textContent.
"use strict";

(() => {
  const KEY = { token: "llm_magic.token", chats: "llm_magic.conversations", current: "llm_magic.current",
                settings: "llm_magic.settings" };
  const DEFAULTS = { system: "", temperature: 0.7, max_tokens: 1024, top_p: 0.95, show_thinking: true };
  const $ = (id) => document.getElementById(id);

  const state = {
    chats: load(KEY.chats, []),
    current: localStorage.getItem(KEY.current),
    settings: { ...DEFAULTS, ...load(KEY.settings, {}) },
    token: localStorage.getItem(KEY.token) || "",
    needsToken: true,
    controller: null, // the AbortController of the answer being written
    whole: false, // this page came through a tunnel that buffers streams: ask for whole answers
  };

  function load(key, fallback) {
    try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
  }
  function saveChats() {
    localStorage.setItem(KEY.chats, JSON.stringify(state.chats));
    localStorage.setItem(KEY.current, state.current || "");
  }
  function chat() { return state.chats.find((c) => c.id === state.current); }
  function newChat() {
    const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
    state.chats.unshift(c);
    state.current = c.id;
    saveChats();
    return c;
  }

  // -- Markdown, sanitised ---------------------------------------------------------------

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
  });

  function renderMarkdown(el, text) {
    el.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
    el.querySelectorAll("pre code").forEach((code) => {
      hljs.highlightElement(code);
      const button = document.createElement("button");
      button.type = "button"; button.className = "copy-code"; button.textContent = "Copy";
      button.addEventListener("click", () => copy(code.textContent, button));
      code.parentElement.appendChild(button);
    });
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch {  // no clipboard API (an http:// page on a phone): select-and-copy instead
      const area = document.createElement("textarea");
      area.value = text; document.body.appendChild(area); area.select();
      document.execCommand("copy"); area.remove();
    }
    const label = button.textContent; button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1200);
  }

  // -- the page --------------------------------------------------------------------------

  function renderSidebar() {
    const list = $("conversations");
    list.replaceChildren();
    for (const c of state.chats) {
      const li = document.createElement("li");
      if (c.id === state.current) li.className = "current";
      const title = document.createElement("button");
      title.type = "button"; title.className = "title"; title.textContent = c.title; title.title = c.title;
      title.addEventListener("click", () => { if (!state.controller) { state.current = c.id; saveChats(); renderAll(); }
                                               document.body.classList.remove("show-sidebar"); });
      const rename = smallButton("✎", "Rename", () => {
        const name = prompt("Rename this conversation", c.title);
        if (name && name.trim()) { c.title = name.trim().slice(0, 80); saveChats(); renderSidebar(); }
      });
      const remove = smallButton("✕", "Delete", () => {
        if (state.controller && c.id === state.current) return;
        if (!confirm(`Delete "${c.title}"?`)) return;
        state.chats = state.chats.filter((x) => x.id !== c.id);
        if (state.current === c.id) state.current = state.chats[0]?.id || null;
        saveChats(); renderAll();
      });
      li.append(title, rename, remove);
      list.appendChild(li);
    }
  }

  function smallButton(text, label, onClick) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "small"; b.textContent = text; b.title = label; b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  function renderMessages() {
    const box = $("messages");
    box.replaceChildren();
    const c = chat();
    if (!c) return;
    c.messages.forEach((m, i) => box.appendChild(messageElement(m, i === c.messages.length - 1)));
    box.scrollTop = box.scrollHeight;
  }

  // The reasoning as text (it is the model's scratch work, not Markdown), under a summary that
  // says "Thinking…" while it streams and for how long once the answer began.
  function thinkingElement(m) {
    const details = document.createElement("details");
    details.className = "thinking"; details.hidden = !m.reasoning;
    const summary = document.createElement("summary");
    summary.textContent = thinkingLabel(m);
    const text = document.createElement("div");
    text.className = "reasoning"; text.textContent = m.reasoning || "";
    details.append(summary, text);
    return details;
  }
  function thinkingLabel(m) {
    if (m.thought_for == null) return "Thinking…";
    return `Thought for ${m.thought_for < 10 ? m.thought_for.toFixed(1) : m.thought_for.toFixed(0)} s`;
  }
  function reasoningOf(part) { return part?.reasoning_content ?? part?.reasoning ?? ""; }  // vLLM: "reasoning"

  function messageElement(m, last) {
    const wrap = document.createElement("div");
    wrap.className = `message ${m.role}`;
    if (m.role === "assistant") wrap.appendChild(thinkingElement(m));
    const body = document.createElement("div");
    body.className = "body";
    if (m.role === "user") body.textContent = m.content;
    else renderMarkdown(body, m.content);
    wrap.appendChild(body);
    const tools = document.createElement("div");
    tools.className = "tools";
    if (m.role === "assistant") {
      const copyAnswer = document.createElement("button");
      copyAnswer.type = "button"; copyAnswer.textContent = "Copy";
      copyAnswer.addEventListener("click", () => copy(m.content, copyAnswer));
      tools.appendChild(copyAnswer);
      if (last) {
        const again = document.createElement("button");
        again.type = "button"; again.textContent = "Regenerate"; again.className = "regenerate";
        again.addEventListener("click", regenerate);
        tools.appendChild(again);
      }
      if (m.note) { const note = document.createElement("span"); note.className = "note"; note.textContent = m.note; tools.appendChild(note); }
    } else if (last || isLastUser(m)) {
      const edit = document.createElement("button");
      edit.type = "button"; edit.textContent = "Edit"; edit.className = "edit";
      edit.addEventListener("click", editLast);
      tools.appendChild(edit);
    }
    if (tools.childElementCount) wrap.appendChild(tools);
    return wrap;
  }

  function isLastUser(m) {
    const c = chat();
    const users = c ? c.messages.filter((x) => x.role === "user") : [];
    return users[users.length - 1] === m;
  }

  function renderAll() { renderSidebar(); renderMessages(); }

  function showError(text) {
    const line = document.createElement("div");
    line.className = "error-line"; line.setAttribute("role", "alert"); line.textContent = text;
    $("messages").appendChild(line);
    line.scrollIntoView({ block: "end" });
  }

  function setWriting(on) {
    $("send").hidden = on; $("stop").hidden = !on;
    document.querySelectorAll(".regenerate, .edit").forEach((b) => { b.disabled = on; });
  }

  // -- talking to the host ----------------------------------------------------------------

  async function refreshHealth() {
    const status = $("status");
    try {
      const r = await fetch("health", { cache: "no-store" });
      const h = await r.json();
      $("model").textContent = h.model || "";
      state.needsToken = h.auth !== false;
      const busy = h.slots_busy || 0;
      const pace = h.decode_tokens_per_second || 0;  // the whole host's, every answer together
      status.textContent = h.status === "loading" ? "loading"
        : busy ? `busy ${busy}/${h.slots}` + (pace ? ` · ${pace.toFixed(0)} tok/s` : "") : "ready";
      status.className = "status " + (h.status === "ok" && !busy ? "ok" : "busy");
      status.title = `${h.slots_busy}/${h.slots} slots busy, ${h.queue} waiting, ${pace.toFixed(1)} tokens/s on the host`;
      state.hostBusy = busy > 0;
      // The host checked its tunnel: if it delivers a stream all at once, a stream would look
      // frozen, so through that tunnel the page asks for whole answers.
      const tunnel = h.tunnel || {};
      state.whole = tunnel.streams === false && !!tunnel.public_url && new URL(tunnel.public_url).host === location.host;
      if (state.whole) status.title += "; this tunnel delivers answers whole, so each appears when it is complete";
    } catch {
      status.textContent = "unreachable"; status.className = "status down";
    }
    $("token-gate").hidden = !(state.needsToken && !state.token);
  }

  // The last answer's pace and tokens, with those its reasoning took.
  function showStats(timings, usage) {
    const parts = [];
    if (timings?.predicted_per_second) parts.push(`${timings.predicted_per_second.toFixed(1)} tokens/s`);
    if (usage?.completion_tokens != null) {
      const thinking = usage.completion_tokens_details?.reasoning_tokens;
      parts.push(`${usage.completion_tokens} tokens` + (thinking ? ` (${thinking} thinking)` : ""));
    }
    if (parts.length) $("speed").textContent = parts.join(" · ");
  }

  function applySettings() { document.body.classList.toggle("hide-thinking", !state.settings.show_thinking); }

  function requestBody(c) {
    const s = state.settings;
    const messages = c.messages.filter((m) => !m.failed).map((m) => ({ role: m.role, content: m.content }));
    if (s.system.trim()) messages.unshift({ role: "system", content: s.system });
    const stream = state.whole ? { stream: false } : { stream: true, stream_options: { include_usage: true } };
    return { messages, ...stream,
             temperature: Number(s.temperature), max_tokens: Number(s.max_tokens), top_p: Number(s.top_p) };
  }

  async function explain(response) {
    let message = `the host answered ${response.status}`;
    try { message = (await response.json()).error.message || message; } catch { /* not JSON: keep the status */ }
    if (response.status === 401) return `The host refused the token (${message}). Paste it again in Settings (⚙).`;
    if (response.status === 503) {
      const retry = response.headers.get("Retry-After");
      return `The host is busy: ${message}${retry ? ` (retry in ${retry} s)` : ""}.`;
    }
    return `Error ${response.status}: ${message}`;
  }

  async function answer() {
    const c = chat();
    if (state.needsToken && !state.token) { $("token-gate").hidden = false; $("token-input").focus(); return; }
    const reply = { role: "assistant", content: "", reasoning: "" };
    const box = $("messages");
    const el = messageElement(reply, false);
    box.appendChild(el);
    const body = el.querySelector(".body");
    const thinking = el.querySelector(".thinking");
    const started = performance.now();
    const think = (piece) => {  // open while it streams, so that it is seen
      if (!reply.reasoning) { thinking.hidden = false; thinking.open = true; }
      reply.reasoning += piece;
      thinking.querySelector(".reasoning").textContent = reply.reasoning;
      box.scrollTop = box.scrollHeight;
    };
    const thought = () => {  // the answer begins, or the reply ended: fold the reasoning away
      if (!reply.reasoning || reply.thought_for != null) return;
      reply.thought_for = (performance.now() - started) / 1000;
      thinking.querySelector("summary").textContent = thinkingLabel(reply);
      thinking.open = false;
    };
    const controller = new AbortController();
    state.controller = controller;
    setWriting(true);
    let pending = false;
    const paint = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; renderMarkdown(body, reply.content); box.scrollTop = box.scrollHeight; });
    };
    let failure = null;
    try {
      const headers = { "Content-Type": "application/json" };
      if (state.token) headers.Authorization = `Bearer ${state.token}`;
      const response = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(requestBody(c)),
                                                            signal: controller.signal });
      if (!response.ok) throw new Error(await explain(response));
      if (!response.headers.get("Content-Type")?.startsWith("text/event-stream")) {
        const whole = await response.json(); // leading keep-alive spaces are valid JSON
        if (whole.error) throw new Error(`Error: ${whole.error.message}`);
        const message = whole.choices?.[0]?.message;
        const reasoning = reasoningOf(message);
        if (reasoning) { think(reasoning); thought(); }
        reply.content = message?.content || "";
        paint();
        showStats(whole.timings, whole.usage);
        if (whole.choices?.[0]?.finish_reason === "length") reply.note = "(cut at max tokens)";
      } else {
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
            for (const line of event.split("\n")) {
              if (!line.startsWith("data: ") || line === "data: [DONE]") continue;  // ": keep-alive" comments too
              const chunk = JSON.parse(line.slice(6));
              if (chunk.error) throw new Error(`Error: ${chunk.error.message}`);
              const reasoning = reasoningOf(chunk.choices?.[0]?.delta);
              if (reasoning) think(reasoning);
              const delta = chunk.choices?.[0]?.delta?.content;
              if (delta) { thought(); reply.content += delta; paint(); }
              if (chunk.timings || chunk.usage) showStats(chunk.timings, chunk.usage);
              const finish = chunk.choices?.[0]?.finish_reason;
              if (finish === "length") reply.note = "(cut at max tokens)";
            }
          }
        }
      }
    } catch (err) {
      if (err.name === "AbortError") reply.note = "(stopped)";
      else if (err instanceof TypeError) failure = "Cannot reach the host: is it still running? (the page will keep trying)";
      else failure = err.message;
    } finally {
      thought();
      state.controller = null;
      setWriting(false);
    }
    if (!reply.reasoning) delete reply.reasoning;
    if (reply.content || !failure) c.messages.push(reply);
    if (c.title === "New chat") { const first = c.messages.find((m) => m.role === "user"); if (first) c.title = first.content.slice(0, 40); }
    saveChats();
    renderAll();
    if (failure) showError(failure);
    refreshHealth();
  }

  function send(text) {
    const c = chat() || newChat();
    c.messages.push({ role: "user", content: text });
    saveChats();
    renderAll();
    return answer();
  }

  function regenerate() {
    const c = chat();
    if (!c || state.controller) return;
    if (c.messages[c.messages.length - 1]?.role === "assistant") c.messages.pop();
    saveChats(); renderAll();
    answer();
  }

  function editLast() {
    const c = chat();
    if (!c || state.controller) return;
    const i = c.messages.map((m) => m.role).lastIndexOf("user");
    if (i < 0) return;
    $("prompt").value = c.messages[i].content;
    c.messages.splice(i);
    saveChats(); renderAll();
    $("prompt").focus();
  }

  // -- wiring ----------------------------------------------------------------------------

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) state.controller.abort(); });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", () => { if (!state.controller) { newChat(); renderAll(); $("prompt").focus(); } });
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    localStorage.setItem(KEY.token, state.token);
    $("token-input").value = "";
    refreshHealth();
    $("prompt").focus();
  });

  const fields = { system: "system", temperature: "temperature", max_tokens: "max-tokens", top_p: "top-p" };
  $("open-settings").addEventListener("click", () => {
    for (const [key, id] of Object.entries(fields)) $(id).value = state.settings[key];
    $("show-thinking").checked = state.settings.show_thinking;
    $("settings-token").value = state.token;
    $("settings").showModal();
  });
  $("settings-form").addEventListener("submit", (e) => {
    if (e.submitter?.value !== "save") return;
    for (const [key, id] of Object.entries(fields)) state.settings[key] = key === "system" ? $(id).value : Number($(id).value);
    state.settings.show_thinking = $("show-thinking").checked;
    localStorage.setItem(KEY.settings, JSON.stringify(state.settings));
    applySettings();
    state.token = $("settings-token").value.trim();
    localStorage.setItem(KEY.token, state.token);
    refreshHealth();
  });
  $("forget-token").addEventListener("click", () => {
    state.token = ""; localStorage.removeItem(KEY.token); $("settings-token").value = "";
    refreshHealth();
  });

  if (!chat()) state.current = state.chats[0]?.id || newChat().id;
  applySettings();
  renderAll();
  // Gently: every 15 s, every 3 s while the host is busy; not at all while the tab is hidden.
  async function pollHealth() {
    if (!document.hidden) await refreshHealth();
    setTimeout(pollHealth, state.hostBusy ? 3000 : 15000);
  }
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshHealth(); });
  pollHealth();
})();
