// The arena page. Every text from the server (questions, answers, names) goes in with
// textContent, never innerHTML: a <script> typed or generated is shown, not run.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { battle: null, voting: false, chatHistory: {}, chatBusy: false, config: null };

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { const j = await response.json(); if (j.detail) detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); } catch (e) {}
    throw new Error(detail);
  }
  return response;
}

// Server-sent events over fetch (EventSource cannot POST): calls onEvent(name, data).
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function statusText(s) {
  if (!s) return "";
  if (s.state === "queued") return s.ahead > 0 ? `waiting: ${s.ahead} answer(s) ahead` : "waiting";
  if (s.state === "generating") return "writing...";
  return "";
}

// ------------------------------------------------------------------ battles
function setVotesEnabled(on) {
  document.querySelectorAll(".vote").forEach((b) => { b.disabled = !on; });
}

function showBattle(b) {
  state.battle = b.battle;
  sessionStorage.setItem("arena-battle", b.battle);
  $("#battle").hidden = false;
  // a rewrite battle shows its draft as the text to rewrite, not the instruction before it
  const rewrite = b.task === "rewrite";
  $("#battle-kind").textContent = rewrite ? "Rewrite in the author's voice" : "Question";
  $("#battle-question").textContent = rewrite ? (b.draft ?? b.question) : b.question;
  $("#battle-question").classList.toggle("draft", rewrite);
  $("#reference-label").textContent = rewrite ? "The author's original" : "The author's answer";
  $("#battle-source").textContent = b.from_test ? "(from the test split)" : "(typed)";
  $("#answer-a").textContent = b.answers.A;
  $("#answer-b").textContent = b.answers.B;
  $("#status-a").textContent = $("#status-b").textContent = "";
  $("#reveal").hidden = true;
  $("#reveal-names").textContent = $("#reference").textContent = "";  // not even hidden: the
  setVotesEnabled(false);                                           // last battle's names go
  if (b.voted) showReveal(b.reveal);
  else if (b.error) $("#battle-message").textContent = b.error;
  else follow(b.battle, b.answers.A.length, b.answers.B.length);
}

async function follow(id, a, b) {
  try {
    const response = await api(`/api/battles/${encodeURIComponent(id)}/stream?a=${a}&b=${b}`);
    await readEvents(response, (name, data) => {
      if (state.battle !== id) return;
      if (name === "text") {
        const box = data.side === "A" ? $("#answer-a") : $("#answer-b");
        box.textContent += data.text;
      } else if (name === "status") {
        $("#status-a").textContent = statusText(data.A);
        $("#status-b").textContent = statusText(data.B);
      } else if (name === "end") {
        $("#status-a").textContent = $("#status-b").textContent = "";
        setVotesEnabled(true);
      } else if (name === "failed") {
        $("#battle-message").textContent = data.message;
      }
    });
  } catch (err) {
    if (state.battle === id) $("#battle-message").textContent = err.message;
  }
}

async function newBattle(question) {
  $("#battle-message").textContent = "";
  try {
    const body = { question, abandon: state.battle };
    const b = await (await api("/api/battles", body)).json();
    showBattle(b);
  } catch (err) {
    $("#battle-message").textContent = err.message;
  }
}

async function vote(choice) {
  if (state.voting || !state.battle) return;
  state.voting = true;
  setVotesEnabled(false);
  try {
    const b = await (await api(`/api/battles/${encodeURIComponent(state.battle)}/vote`, { vote: choice })).json();
    showReveal(b.reveal);
    refreshRatings();
  } catch (err) {
    $("#battle-message").textContent = err.message;
  } finally {
    state.voting = false;
  }
}

const VOTE_WORDS = { A: "you preferred A", B: "you preferred B", tie: "a tie", both_bad: "both bad" };

function showReveal(r) {
  setVotesEnabled(false);
  $("#reveal").hidden = false;
  $("#reveal-names").textContent = `A was ${r.A}, B was ${r.B}: ${VOTE_WORDS[r.vote]}.`;
  $("#reveal-reference").hidden = !r.reference;
  $("#reference").textContent = r.reference || "";
}

async function refreshRatings() {
  try {
    const r = await (await api("/api/ratings")).json();
    const body = $("#ratings tbody");
    body.replaceChildren();
    const rows = (r.table && r.table.rows) || [];
    const voice = rows.some((row) => "voice_score" in row);  // only when the server has scores
    $("#voice-column").hidden = !voice;
    for (const row of rows) {
      const tr = document.createElement("tr");
      const cells = [row.model, fmt(row.rating, 0), interval(row.rating_ci),
        fmt(row.controlled_rating, 0), interval(row.controlled_rating_ci),
        row.battles, row.wins, row.ties, row.losses, row.both_bad,
        row.win_rate == null ? "" : `${fmt(100 * row.win_rate, 0)}%`];
      if (voice) {
        cells.push(row.voice_score == null ? "" : fmt(row.voice_score, 2) +
          (row.voice_gap_closed == null ? "" : ` (${fmt(100 * row.voice_gap_closed, 0)}% of the gap)`) +
          (row.voice_gap_closed_ci ? ` ${fmt(100 * row.voice_gap_closed_ci[0], 0)} … ${fmt(100 * row.voice_gap_closed_ci[1], 0)}%` : ""));
      }
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
      body.appendChild(tr);
    }
    $("#ratings-note").textContent = r.votes ? `${r.votes} vote(s) in ${r.file}` +
      (r.table && r.table.note ? `; ${r.table.note}` : "") : "No votes yet.";
  } catch (err) {
    $("#ratings-note").textContent = `Ratings unavailable: ${err.message}`;
  }
}

function fmt(x, digits) { return x == null ? "" : Number(x).toFixed(digits); }

function interval(ci) { return ci ? `${fmt(ci[0], 0)} … ${fmt(ci[1], 0)}` : ""; }

// ------------------------------------------------------------------ chat
function chatModels() {
  return [...document.querySelectorAll("#chat-models input:checked")].map((i) => i.value);
}

function renderChatColumns() {
  const columns = $("#chat-columns");
  columns.replaceChildren();
  for (const name of chatModels()) {
    const col = document.createElement("article");
    col.className = "chat-column";
    col.id = `chat-${name}`;
    const h = document.createElement("h2");
    h.textContent = name;
    col.appendChild(h);
    for (const turn of state.chatHistory[name] || []) col.appendChild(turnElement(turn.role, turn.content));
    columns.appendChild(col);
  }
}

function turnElement(role, text) {
  const p = document.createElement("div");
  p.className = `turn ${role}`;
  p.textContent = text;
  return p;
}

async function sendChat() {
  const text = $("#chat-input").value.trim();
  if (state.chatBusy) return;
  if (!text) { $("#chat-message").textContent = "Type a message first."; return; }
  state.chatBusy = true;
  $("#chat-send").disabled = true;
  $("#chat-message").textContent = "";
  $("#chat-input").value = "";
  try {
    for (const name of chatModels()) {
      const history = state.chatHistory[name] || (state.chatHistory[name] = []);
      const col = $(`#chat-${name}`);
      col.appendChild(turnElement("user", text));
      const answer = turnElement("assistant", "");
      const status = document.createElement("p");
      status.className = "status";
      col.appendChild(status);
      col.appendChild(answer);
      const messages = [...history, { role: "user", content: text }];
      let complete = false;
      const response = await api("/api/chat", { model: name, messages });
      await readEvents(response, (event, data) => {
        if (event === "text") answer.textContent += data.text;
        else if (event === "status") status.textContent = statusText(data);
        else if (event === "end") { status.textContent = `${data.tokens} tokens, ${data.seconds} s` +
          (data.finish_reason === "length" ? " (hit the length limit)" : ""); complete = true; }
        else if (event === "failed") status.textContent = data.message;
      });
      if (complete) history.push({ role: "user", content: text }, { role: "assistant", content: answer.textContent });
    }
  } catch (err) {
    $("#chat-message").textContent = err.message;
  } finally {
    state.chatBusy = false;
    $("#chat-send").disabled = false;
  }
}

// ------------------------------------------------------------------ start
async function start() {
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((o) => o.setAttribute("aria-selected", String(o === t)));
    $("#tab-arena").hidden = t.dataset.tab !== "arena";
    $("#tab-chat").hidden = t.dataset.tab !== "chat";
  }));
  $("#battle-test").addEventListener("click", () => newBattle(null));
  $("#battle-ask").addEventListener("click", () => newBattle($("#battle-typed").value));
  $("#battle-next").addEventListener("click", () => newBattle(null));
  document.querySelectorAll(".vote").forEach((b) => b.addEventListener("click", () => vote(b.dataset.vote)));
  $("#chat-send").addEventListener("click", sendChat);
  $("#chat-reset").addEventListener("click", () => { state.chatHistory = {}; renderChatColumns(); });

  state.config = await (await api("/api/config")).json();
  $("#persona").textContent = state.config.system;
  $("#battle-test").disabled = !state.config.test_questions;
  const boxes = $("#chat-models");
  state.config.chat_models.forEach((name, i) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = name;
    input.checked = i < 2;
    input.addEventListener("change", renderChatColumns);
    label.append(input, ` ${name}`);
    boxes.appendChild(label);
  });
  renderChatColumns();
  refreshRatings();

  const saved = sessionStorage.getItem("arena-battle");  // a reload mid-battle resumes it
  if (saved) {
    try { showBattle(await (await api(`/api/battles/${encodeURIComponent(saved)}`)).json()); }
    catch (err) { sessionStorage.removeItem("arena-battle"); }
  }
}

start();
