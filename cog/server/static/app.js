// cog's page: the package list, a package's page and its "Try it" form, drawn from the
// server's JSON API. Plain JavaScript, no build step. Text from the server is only ever
// set as text (never as HTML).
"use strict";
(() => {
  const main = document.getElementById("main");
  const TOKEN = "cog-token";
  const PAGE = 100;
  let server = { builder: "", predictions: false };
  let serverKnown = Promise.resolve();
  let view = new AbortController();

  // -- small helpers ---------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value == null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (value === true) el.setAttribute(key, "");
      else el.setAttribute(key, value);
    }
    for (const child of children.flat(Infinity)) {
      if (child != null && child !== false) el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function formatSize(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function timeAgo(iso) {
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    const steps = [[60, "second"], [60, "minute"], [24, "hour"], [30, "day"], [12, "month"], [Infinity, "year"]];
    let value = seconds;
    for (const [size, unit] of steps) {
      if (value < size) {
        const n = Math.floor(value);
        if (unit === "second" && n < 10) return "just now";
        return `${n} ${unit}${n === 1 ? "" : "s"} ago`;
      }
      value /= size;
    }
    return "";
  }

  // One formatter for every row: Date.toLocaleString() builds a new one per call, which
  // cost the list ~40 ms of its first render (100 rows, headless Chromium).
  let localTime = null;
  function when(iso) {
    localTime ??= new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
    return h("time", { datetime: iso, title: localTime.format(new Date(iso)), "data-ago": "" }, timeAgo(iso));
  }

  setInterval(() => {
    for (const el of document.querySelectorAll("time[data-ago]")) el.textContent = timeAgo(el.dateTime);
  }, 30000);

  function badge(status) {
    return h("span", { class: `badge ${status}` }, status || "unknown");
  }

  function copyButton(text, label = "Copy") {
    const button = h("button", { type: "button", class: "small", title: "Copy to the clipboard" }, label);
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(text);
      } catch {
        // no clipboard (plain HTTP on another host): select the text for a manual copy
        const field = h("textarea", {});
        field.value = text;
        document.body.append(field);
        field.select();
        document.execCommand("copy");
        field.remove();
      }
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = label; }, 1500);
    });
    return button;
  }

  function command(text) {
    return h("div", { class: "cmd" }, h("pre", {}, text), copyButton(text));
  }

  function notice(kind, ...children) {
    return h("div", { class: `notice ${kind}` }, ...children);
  }

  function shortId(id) { return id.slice(0, 12); }

  function quote(value) {
    // a value as a shell word
    return /^[\w@%+=:,./-]+$/.test(value) ? value : `'${value.replace(/'/g, "'\\''")}'`;
  }

  // -- the API, with the token when the server asks for one --------------------------

  const dialog = document.getElementById("token-dialog");
  const tokenButton = document.getElementById("token-button");
  let asking = null;

  function askToken(why) {
    if (!asking) {
      asking = new Promise((resolve) => {
        document.getElementById("token-why").firstChild.textContent =
          why || "Paste a token (from ";
        const input = document.getElementById("token-input");
        input.value = "";
        dialog.showModal();
        dialog.addEventListener("close", function done() {
          dialog.removeEventListener("close", done);
          if (input.value.trim()) sessionStorage.setItem(TOKEN, input.value.trim());
          asking = null;
          showTokenButton();
          resolve();
        });
      });
    }
    return asking;
  }

  function showTokenButton() {
    tokenButton.hidden = !sessionStorage.getItem(TOKEN);
    tokenButton.textContent = "Forget token";
  }

  tokenButton.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN);
    showTokenButton();
    route();
  });

  async function api(path, options = {}) {
    for (;;) {
      const headers = new Headers(options.headers || {});
      const token = sessionStorage.getItem(TOKEN);
      if (token) headers.set("Authorization", `Bearer ${token}`);
      const response = await fetch(path, { ...options, headers });
      if (response.status !== 401) return response;
      await askToken(token ? "That token was refused. Paste another (from " : null);
    }
  }

  async function problem(response) {
    let message = `${response.status} ${response.statusText}`;
    let body = null;
    try {
      body = await response.json();
      if (body && body.error) message = body.error;
    } catch { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    error.body = body;
    return error;
  }

  async function getJSON(path, signal) {
    const response = await api(path, { signal });
    if (!response.ok) throw await problem(response);
    return response.json();
  }

  // An image the API serves, shown through a blob URL (an <img src> cannot send a token).
  function picture(path, alt) {
    const img = h("img", { alt, loading: "lazy" });
    api(path).then(async (response) => {
      if (!response.ok) throw await problem(response);
      img.src = URL.createObjectURL(await response.blob());
    }).catch((error) => img.replaceWith(h("span", { class: "muted" }, `(${alt}: ${error.message})`)));
    return img;
  }

  // -- pages ---------------------------------------------------------------------------

  function navigate(url) {
    history.pushState(null, "", url);
    route();
  }

  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-nav]");
    if (!link || event.button || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    navigate(link.getAttribute("href"));
  });
  window.addEventListener("popstate", route);

  function route() {
    view.abort();
    view = new AbortController();
    const signal = view.signal;
    const match = location.pathname.match(/^\/packages\/([^/]+)$/);
    const shown = match ? showPackage(decodeURIComponent(match[1]), signal) : showList(signal);
    shown.catch((error) => {
      if (signal.aborted) return;
      main.replaceChildren(
        notice("bad", h("strong", {}, error.status === 404 ? "Not found. " : "Could not load this page. "), error.message),
        h("p", {}, h("a", { href: "/", "data-nav": "" }, "← All packages")),
      );
    });
  }

  // -- the list ------------------------------------------------------------------------

  function packageRow(p) {
    const href = `/packages/${p.ID}`;
    return h("tr", {},
      h("td", { class: "name" }, h("a", { href, "data-nav": "" }, p.Name)),
      h("td", { class: "id mono" }, shortId(p.ID)),
      h("td", { class: "status" }, badge(p.Status)),
      h("td", { class: "created" }, when(p.Created)),
      h("td", { class: "size num" }, formatSize(p.Size || 0)));
  }

  async function showList(signal) {
    document.title = "Packages · cog";
    let name = new URLSearchParams(location.search).get("name") || "";
    const filter = h("input", { type: "search", placeholder: "Filter by name", "aria-label": "Filter by name", value: name });
    const count = h("span", { class: "muted" });
    const rows = h("tbody");
    const table = h("table", { class: "packages" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "ID"), h("th", {}, "Status"),
        h("th", {}, "Created"), h("th", { class: "num" }, "Size"))),
      rows);
    const footer = h("div", { class: "more" });
    const notes = h("div");
    main.replaceChildren(notes, h("div", { class: "listhead" }, h("h1", {}, "Packages ", count), filter), table, footer);
    serverKnown.then(() => {
      if (server.builder === null) {
        notes.append(notice("warn", h("strong", {}, "This server has no builder. "),
          "It stores packages as they are: no images are built or checked, and models cannot be run here."));
      }
    });

    let offset = 0;
    let total = 0;
    let asked = 0;
    async function load(reset) {
      const mine = ++asked;
      const query = new URLSearchParams({ limit: PAGE, offset: reset ? 0 : offset });
      if (name) query.set("name", name);
      const response = await api(`/v1/packages/?${query}`, { signal });
      if (!response.ok) throw await problem(response);
      const page = await response.json();
      if (mine !== asked) return; // a newer filter answered first
      total = Number(response.headers.get("X-Total-Count") || page.length);
      offset = (reset ? 0 : offset) + page.length;
      const fragment = document.createDocumentFragment();
      for (const p of page) fragment.append(packageRow(p));
      if (reset) rows.replaceChildren(fragment); else rows.append(fragment);
      // for the benchmark: when the rows were laid out, ready to paint (User Timing)
      requestAnimationFrame(() => setTimeout(() => performance.mark("cog:list-drawn")));
      count.textContent = name ? `(${total} matching)` : `(${total})`;
      footer.replaceChildren();
      if (total === 0 && !name) {
        table.replaceWith(empty());
        filter.disabled = true;
        return;
      }
      if (total === 0) {
        rows.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "muted" }, `No package name contains “${name}”.`)));
      }
      if (offset < total) {
        footer.append(h("span", {}, `Showing ${offset} of ${total}`),
          h("button", { type: "button", onclick: () => load(false) }, `Show ${Math.min(PAGE, total - offset)} more`));
      } else if (total > 0) {
        footer.append(h("span", {}, `All ${total} shown, newest first`));
      }
    }

    let typing = null;
    filter.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => {
        name = filter.value.trim();
        history.replaceState(null, "", name ? `/?name=${encodeURIComponent(name)}` : "/");
        load(true).catch((error) => notes.replaceChildren(notice("bad", error.message)));
      }, 150);
    });
    await load(true);
  }

  function empty() {
    return h("div", { class: "card empty" },
      h("h2", {}, "No packages yet"),
      h("p", { class: "muted" }, "Build a model directory (one with a cog.yaml) and it appears here:"),
      h("pre", { class: "cmd" }, `cog remote set ${location.origin}\ncog build path/to/model`));
  }

  // -- a package -----------------------------------------------------------------------

  async function showPackage(ref, signal) {
    let doc = await getJSON(`/v1/packages/${encodeURIComponent(ref)}`, signal);
    await serverKnown;
    if (ref !== doc.ID) history.replaceState(null, "", `/packages/${doc.ID}`); // the stable URL
    const log = buildLog(doc, signal, async (final) => {
      // the build ended while we watched: show the package as it is now
      if (doc.Status !== "building") return;
      doc = final.package || await getJSON(`/v1/packages/${doc.ID}`, signal);
      draw(doc, log);
    });
    draw(doc, log);
  }

  function draw(doc, log) {
    document.title = `${doc.Name} · cog`;
    const args = (doc.Signature && doc.Signature.arguments) || {};
    const cpu = (doc.Artifacts || []).find((a) => a.Target === "docker-cpu");
    const left = [];
    const right = [];
    if (doc.Status === "ready") left.push(tryIt(doc, args, cpu));
    left.push(inputsCard(args));
    if ((doc.Examples || []).length) left.push(examplesCard(doc));
    right.push(commandsCard(doc, args), configCard(doc), imagesCard(doc));

    const statusNote = [];
    if (doc.Status === "building") {
      statusNote.push(notice("warn", h("strong", {}, "Building. "), "The log below follows the build as it runs; this page updates when it ends."));
    } else if (doc.Status === "failed") {
      statusNote.push(notice("bad", h("strong", {}, "The build failed. "), "The failing step is highlighted in the build log.",
        h("pre", {}, doc.Error || "(no message)")));
    } else if (!server.builder && !(doc.Artifacts || []).length) {
      statusNote.push(notice("", "Stored without images: this server has no builder."));
    }

    const logCard = h("div", { class: "card", id: "log" },
      h("div", { class: "logbar" }, h("h2", {}, "Build log"), log.bar), log.element);
    const busy = doc.Status !== "ready";
    main.replaceChildren(...[
      h("div", { class: "crumbs" }, h("a", { href: "/", "data-nav": "" }, "Packages"), " / ", doc.Name),
      header(doc),
      ...statusNote,
      busy ? logCard : null,
      h("div", { class: "grid" }, h("div", {}, left), h("div", {}, right)),
      busy ? null : logCard,
    ].filter(Boolean));
  }

  function header(doc) {
    const zip = `/v1/packages/${doc.ID}.zip`;
    const download = h("a", { class: "button primary", href: zip, download: "" }, "Download zip");
    download.addEventListener("click", async (event) => {
      if (!sessionStorage.getItem(TOKEN)) return; // a plain link: the browser streams it
      event.preventDefault(); // a token must go with it: fetch it, then save the blob
      const response = await api(zip);
      if (!response.ok) return alert((await problem(response)).message);
      const name = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
      const link = h("a", { href: URL.createObjectURL(await response.blob()), download: name ? name[1] : "package.zip" });
      link.click();
    });
    return h("div", { class: "head" },
      h("div", { class: "title" },
        h("h1", {}, doc.Name), badge(doc.Status),
        h("div", { class: "idline" }, h("span", { class: "mono", id: "package-id" }, doc.ID), copyButton(doc.ID, "Copy ID")),
        h("div", { class: "meta" }, "Created ", when(doc.Created), ` · ${formatSize(doc.Size || 0)} · `,
          h("span", { class: "mono" }, (doc.Config || {}).Model || ""))),
      download);
  }

  function describeType(spec) {
    return spec.type === "Path" ? "file" : spec.type;
  }

  function inputsCard(args) {
    const names = Object.keys(args);
    if (!names.length) return h("div", { class: "card" }, h("h2", {}, "Inputs"), h("p", { class: "muted" }, "This model takes no inputs."));
    const rows = names.map((name) => {
      const spec = args[name];
      const limits = [];
      if (spec.min != null) limits.push(`min ${spec.min}`);
      if (spec.max != null) limits.push(`max ${spec.max}`);
      return h("tr", {},
        h("td", {}, name),
        h("td", {}, describeType(spec)),
        h("td", { class: "mono" }, "default" in spec ? JSON.stringify(spec.default) : h("span", { class: "muted" }, "required")),
        h("td", {}, limits.join(", "), spec.options ? h("div", { class: "pills" }, spec.options.map((o) => h("span", {}, String(o)))) : null),
        h("td", {}, spec.help || ""));
    });
    return h("div", { class: "card" }, h("h2", {}, "Inputs"),
      h("div", { class: "scroll" }, h("table", { class: "inputs" },
        h("thead", {}, h("tr", {}, ["Name", "Type", "Default", "Limits", "Help"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows))));
  }

  function isPicture(name) { return /\.(png|jpe?g|gif|webp)$/i.test(name); }

  function exampleValue(doc, value) {
    if (typeof value === "string" && value.startsWith("@")) {
      const file = value.slice(1);
      const path = `/v1/packages/${doc.ID}/files/${file.split("/").map(encodeURIComponent).join("/")}`;
      if (isPicture(file)) return h("div", {}, picture(path, file), h("div", { class: "muted" }, file));
      return h("span", { class: "value" }, `file ${file}`);
    }
    return h("span", { class: "value" }, value == null ? "(not checked)" : String(value));
  }

  function examplesCard(doc) {
    const items = doc.Examples.map((example, i) => {
      const inputs = Object.entries(example.Input || {});
      return h("div", { class: "example" },
        h("div", { class: "io" },
          h("div", {}, h("h3", {}, `Example ${i + 1}: input`),
            inputs.length ? h("dl", { class: "facts" }, inputs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, exampleValue(doc, v))]))
              : h("span", { class: "muted" }, "the defaults")),
          h("div", {}, h("h3", {}, "Output"), exampleValue(doc, example.Output))));
    });
    return h("div", { class: "card" }, h("h2", {}, "Examples"), items);
  }

  function commandsCard(doc, args) {
    const first = (doc.Examples || []).find((e) => Object.keys(e.Input || {}).length);
    const parts = [`cog infer ${shortId(doc.ID)}`];
    if (first) {
      for (const [k, v] of Object.entries(first.Input)) parts.push(`-i ${quote(`${k}=${v}`)}`);
    } else {
      for (const [k, spec] of Object.entries(args)) {
        if ("default" in spec) continue;
        parts.push(spec.type === "Path" ? `-i ${k}=@${k}.png` : `-i ${k}=…`);
      }
    }
    const image = ((doc.Artifacts || []).find((a) => a.Target === "docker-cpu") || (doc.Artifacts || [])[0] || {}).URI;
    return h("div", { class: "card" }, h("h2", {}, "Run it"),
      command(`cog remote set ${location.origin}\n${parts.join(" ")}`),
      image ? command(`docker run --rm -p 5000:5000 ${image}\ncurl -F ${Object.keys(args)[0] || "input"}=… localhost:5000/infer`) : null,
      command(`cog download ${shortId(doc.ID)}`));
  }

  function configCard(doc) {
    const config = doc.Config || {};
    const env = config.Environment || {};
    const list = (v) => (Array.isArray(v) && v.length ? h("div", { class: "pills" }, v.map((x) => h("span", {}, x))) : h("span", { class: "muted" }, "none"));
    const facts = [
      ["Model", h("span", { class: "mono" }, config.Model || "")],
      ["Python", env.PythonVersion || ""],
      ["Architectures", (env.Architectures || []).join(", ")],
    ];
    if (env.CUDA) facts.push(["CUDA / cuDNN", `${env.CUDA} / ${env.CuDNN || "?"}`]);
    facts.push(["Python packages", list(env.PythonPackages)]);
    if (env.PythonRequirements) facts.push(["Requirements", h("span", { class: "mono" }, env.PythonRequirements)]);
    facts.push(["System packages", list(env.SystemPackages)]);
    return h("div", { class: "card" }, h("h2", {}, "Configuration"),
      h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  }

  function imagesCard(doc) {
    const artifacts = doc.Artifacts || [];
    const body = artifacts.length
      ? artifacts.map((a) => h("div", { class: "example" },
        h("h3", {}, a.Target), h("div", { class: "value" }, a.URI), a.Digest ? h("div", { class: "value muted" }, a.Digest) : null))
      : h("p", { class: "muted" }, doc.Status === "building" ? "Not pushed yet." : server.builder ? "No image was pushed." : "This server has no builder.");
    return h("div", { class: "card" }, h("h2", {}, "Images"), body);
  }

  // -- the build log, followed live --------------------------------------------------

  const STEP = /^(Step \d+\/\d+ :|#\d+ \[)/;
  // terminal colour codes (pip's red errors) are not for a page
  const plain = (text) => text.replace(/\x1b\[[0-9;]*[A-Za-z]/g, "");

  function buildLog(doc, signal, onFinal) {
    const element = h("div", { class: "log", role: "log" });
    const bar = h("span", { class: "muted" }, "Loading…");
    let final = null;

    function line(event) {
      if (event.type === "status") return h("div", { class: "status" }, `--> ${event.message}`);
      if (event.type === "log") {
        const where = [event.target, event.stage].filter(Boolean).join("/");
        return h("div", { class: event.stage === "error" ? "error" : "" }, h("span", { class: "where" }, `[${where}]`), plain(event.line));
      }
      if (event.type === "error") return h("div", { class: "error" }, `--> Failed: ${event.message}`);
      if (event.type === "package") return h("div", { class: "end" }, `--> Built ${event.package.ID}`);
      return null;
    }

    (async () => {
      const response = await api(`/v1/packages/${doc.ID}/log`, { signal });
      if (response.status === 404) {
        bar.textContent = "";
        element.append(h("div", {}, doc.Status === "building" ? "The build runs on another server: its log is stored when it ends."
          : "No build log: this package was stored without a build."));
        return;
      }
      if (!response.ok) throw await problem(response);
      bar.textContent = doc.Status === "building" ? "following live…" : "";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += decoder.decode(value, { stream: true });
        const lines = pending.split("\n");
        pending = lines.pop();
        const atBottom = element.scrollHeight - element.scrollTop - element.clientHeight < 40;
        const fragment = document.createDocumentFragment();
        for (const text of lines) {
          if (!text.trim()) continue;
          const event = JSON.parse(text);
          if (event.type === "package" || event.type === "error") final = event;
          const el = line(event);
          if (el) { el.event = event; fragment.append(el); }
        }
        element.append(fragment);
        if (atBottom) element.scrollTop = element.scrollHeight;
      }
      bar.textContent = "";
      if (final && final.type === "error") highlight(final);
      if (final) onFinal(final);
    })().catch((error) => {
      if (!signal.aborted) { bar.textContent = ""; element.append(h("div", { class: "error" }, `(the log could not be read: ${error.message})`)); }
    });

    function highlight(final) {
      const failing = final.step || ((final.package || {}).Error || "").match(/\(step: (.*)\)$/)?.[1];
      const lines = [...element.children];
      let start = -1;
      if (failing) {
        for (let i = lines.length - 1; i >= 0; i--) {
          const event = lines[i].event || {};
          if (event.type !== "log" || event.stage === "error") continue; // the build's own line
          const text = (event.line || "").trim();
          if (text && (text === failing.trim() || text.startsWith(failing.trim()))) { start = i; break; }
        }
      }
      if (start < 0) start = lines.findIndex((el) => el.classList.contains("error"));
      if (start < 0) return;
      lines[start].classList.add("first");
      for (let i = start; i < lines.length; i++) {
        const event = lines[i].event || {};
        if (i > start && event.type === "log" && event.stage !== "error" && STEP.test(event.line || "")) break;
        if (i > start && event.type === "status") break;
        lines[i].classList.add("failing");
      }
      for (const el of lines) if (el.classList.contains("error")) el.classList.add("failing");
      const jump = h("a", { href: "#log" }, "Jump to the failing step");
      jump.addEventListener("click", (event) => {
        event.preventDefault();
        lines[start].scrollIntoView({ block: "center" });
      });
      bar.replaceChildren(jump);
      element.scrollTop = Math.max(0, lines[start].offsetTop - 60);
    }

    return { element, bar };
  }

  // -- try it: a form from the signature ---------------------------------------------

  function field(name, spec) {
    const id = `input-${name}`;
    const label = h("label", { for: id }, name, h("span", { class: "type" }, describeType(spec)));
    const has = "default" in spec && spec.default !== null;
    let control;
    if (spec.options) {
      control = h("select", { id, name }, spec.options.map((o) => h("option", { value: String(o), selected: has && String(spec.default) === String(o) }, String(o))));
    } else if (spec.type === "bool") {
      control = h("input", { id, name, type: "checkbox", checked: has && spec.default === true });
      return h("div", { class: "field" }, h("div", { class: "check" }, control, label), spec.help ? h("div", { class: "help" }, spec.help) : null);
    } else if (spec.type === "int" || spec.type === "float") {
      control = h("input", { id, name, type: "number", step: spec.type === "int" ? "1" : "any", min: spec.min, max: spec.max, value: has ? spec.default : null, required: !("default" in spec) });
    } else if (spec.type === "Path") {
      control = h("input", { id, name, type: "file", required: !("default" in spec) });
    } else {
      control = h("input", { id, name, type: "text", value: has ? spec.default : null, required: !("default" in spec) });
    }
    const limits = [spec.min != null ? `min ${spec.min}` : null, spec.max != null ? `max ${spec.max}` : null].filter(Boolean).join(", ");
    const help = [spec.help, limits].filter(Boolean).join(" · ");
    return h("div", { class: "field" }, label, control, help ? h("div", { class: "help" }, help) : null);
  }

  function tryIt(doc, args, cpu) {
    const card = h("div", { class: "card", id: "try" }, h("h2", {}, "Try it"));
    if (!cpu) {
      card.append(h("p", { class: "muted" }, server.builder ? "This package has no CPU image to run." : "This server has no builder, so it cannot run models."));
      return card;
    }
    if (!server.predictions) {
      card.append(h("p", { class: "muted" }, "This server does not run models (no Docker engine for predictions)."));
      return card;
    }
    const run = h("button", { type: "submit", class: "primary" }, "Run");
    const state = h("span", { class: "muted" });
    const output = h("div", { class: "output", "aria-live": "polite" });
    const form = h("form", { class: "try" }, Object.entries(args).map(([n, s]) => field(n, s)), h("div", { class: "actions" }, run, state), output);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = new FormData();
      for (const [name, spec] of Object.entries(args)) {
        const control = form.elements[name];
        if (spec.type === "bool") body.append(name, control.checked ? "true" : "false");
        else if (spec.type === "Path") { if (control.files.length) body.append(name, control.files[0]); }
        else if (control.value !== "" || !("default" in spec)) body.append(name, control.value);
      }
      run.disabled = true;
      output.replaceChildren();
      const started = performance.now();
      const ticking = setInterval(() => { state.textContent = `Running… ${((performance.now() - started) / 1000).toFixed(1)}s`; }, 100);
      try {
        const response = await api(`/v1/packages/${doc.ID}/predictions`, { method: "POST", body });
        const seconds = ((performance.now() - started) / 1000).toFixed(2);
        if (!response.ok) {
          const error = await problem(response);
          const problems = (error.body && error.body.problems) || [];
          output.append(notice("bad", h("strong", {}, `Failed (HTTP ${response.status}). `), error.message,
            problems.length ? h("ul", {}, problems.map((p) => h("li", {}, typeof p === "string" ? p : `${p.input}: ${p.message}`))) : null));
          state.textContent = "";
          return;
        }
        await showOutput(output, response);
        const ran = response.headers.get("X-Run-Time");
        state.textContent = `Done in ${seconds}s` + (ran ? ` (the model ran ${Number(ran).toFixed(2)}s)` : "");
      } catch (error) {
        output.append(notice("bad", error.message));
        state.textContent = "";
      } finally {
        clearInterval(ticking);
        run.disabled = false;
      }
    });
    card.append(form);
    return card;
  }

  async function showOutput(output, response) {
    const type = (response.headers.get("Content-Type") || "").split(";")[0];
    const named = (response.headers.get("Content-Disposition") || "").match(/filename="?([^";]+)"?/);
    const title = h("h3", {}, "Output");
    if (type === "application/json") {
      output.append(title, h("pre", { id: "output-value" }, JSON.stringify(await response.json(), null, 2)));
    } else if (type.startsWith("text/")) {
      output.append(title, h("pre", { id: "output-value" }, await response.text()));
    } else {
      const blob = await response.blob();
      const url = URL.createObjectURL(blob);
      const name = named ? named[1] : "output";
      const link = h("a", { href: url, download: name, class: "button" }, `Download ${name} (${formatSize(blob.size)})`);
      output.append(title, type.startsWith("image/") ? h("div", {}, h("img", { src: url, alt: "the model's output", id: "output-image" })) : null, h("div", { class: "actions" }, link));
    }
  }

  // -- start ---------------------------------------------------------------------------

  document.getElementById("server").textContent = location.host;
  showTokenButton();
  // What the server does (its builder) is asked alongside the page's own data.
  const ping = fetch("/ping").then((r) => r.json()).then((info) => { server = info; }).catch(() => {});
  serverKnown = ping;
  route();
})();
