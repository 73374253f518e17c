// The annotator's page: fetch a question, show it, send the answer, repeat.
// Answers are idempotent on the server (one vote per annotator and question), so a
// failed request is simply sent again.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const token = params.get("t");
  let annotator = params.get("a") || "";
  let current = null;
  let shownAt = 0;
  let busy = true;
  const buttons = ["answer-left", "answer-tie", "answer-right"].map($);

  const headers = (extra) => (token ? { ...extra, "X-Study-Token": token } : extra);
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const say = (text) => { $("status").textContent = text; };
  const enable = (on) => { busy = !on; buttons.forEach((b) => { b.disabled = !on; }); };

  function showProgress(progress) {
    $("progress").max = Math.max(progress.target, 1);
    $("progress").value = progress.answered;
    $("progress-text").textContent = `${progress.answered} / ${progress.target}`;
  }

  function load(img, src) {
    return new Promise((done) => {
      img.onload = () => { img.classList.toggle("small", img.naturalWidth < 256); done(); };
      img.onerror = () => done();
      img.src = src;
    });
  }

  async function loadNext() {
    enable(false);
    for (let attempt = 0; ; attempt++) {
      try {
        const r = await fetch(`api/next?annotator=${encodeURIComponent(annotator)}`, { headers: headers({}) });
        const data = await r.json();
        if (!r.ok) { say(data.error || `error ${r.status}`); return; }
        say("");
        showProgress(data.progress);
        if (data.done) { $("question").hidden = true; $("done").hidden = false; return; }
        current = data.question;
        $("prompt").textContent = current.prompt;
        await Promise.all([load($("left"), current.left), load($("right"), current.right)]);
        $("question").hidden = false;
        shownAt = performance.now();
        enable(true);
        return;
      } catch (err) {
        say("Connection problem, retrying…");
        await sleep(Math.min(500 * 2 ** attempt, 8000));
      }
    }
  }

  async function answer(which) {
    if (busy || !current) return;
    enable(false);
    const body = JSON.stringify({ annotator, question: current.id, answer: which,
                                  response_ms: Math.round(performance.now() - shownAt) });
    for (let attempt = 0; ; attempt++) {
      try {
        const r = await fetch("api/vote", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body });
        if (r.ok) break;
        if (r.status < 500) { say((await r.json()).error || `error ${r.status}`); return; }
      } catch (err) { /* network: retry below */ }
      say("Connection problem, retrying…");
      await sleep(Math.min(500 * 2 ** attempt, 8000));
    }
    await loadNext();
  }

  $("answer-left").addEventListener("click", () => answer("left"));
  $("answer-right").addEventListener("click", () => answer("right"));
  $("answer-tie").addEventListener("click", () => answer("tie"));
  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement || event.altKey || event.ctrlKey || event.metaKey) return;
    const which = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie" }[event.key];
    if (which) { event.preventDefault(); answer(which); }
  });

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name").value.trim().replace(/\s+/g, "-").replace(/[^A-Za-z0-9._-]/g, "").slice(0, 64);
    if (!name) { say("Please enter a name (letters or digits)."); return; }
    annotator = name;
    params.set("a", name);
    history.replaceState(null, "", `?${params}`);  // the address is now the link to come back with
    $("login").hidden = true;
    loadNext();
  });

  if (annotator) loadNext(); else { $("login").hidden = false; $("name").focus(); }
})();
