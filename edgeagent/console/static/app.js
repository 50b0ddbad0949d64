// The guard-room console: plain JS, no build step, no third-party code; served by the box itself.
// Everything shown from the daemon goes through textContent (never innerHTML).
"use strict";

const T = {
  zh: {
    title: "监控室", tab_alarms: "警报", tab_gate: "道闸", tab_cameras: "摄像头", tab_devices: "设备", tab_installer: "安装",
    sound_on: "启用声音", logout: "退出", login: "登录", user: "用户名", password: "密码", active_alarms: "当前警报",
    no_alarms: "没有未处理的警报", gate_events: "道闸", plates: "住户车牌", plate: "车牌", ref: "住户", reason: "类别",
    valid_until: "有效期至", uplink: "上行链路", class: "类别", unsent: "未发送", oldest: "最早未发送", type: "类型",
    state: "状态", last_poll: "上次轮询", fault: "故障", tasks: "异常任务", draw: "绘制区域 / 越线", zone: "区域", line: "越线",
    clear: "清除", save: "保存", draw_hint: "在画面上点击放置点（区域至少 3 个点，越线 2 个点）。", doctor: "系统检查",
    run_doctor: "运行检查", capabilities: "各功能状态", device_tests: "设备测试", test: "测试", check: "检查项", result: "结果", detail: "详情", ack: "确认", resolve: "解除",
    acked_by: "已确认", open_for: "已持续", level: "级别", count: "次数", device: "设备", open_gate: "开闸",
    online: "在线", offline: "离线", unknown: "未知", never: "从未", visitor: "访客", resident: "住户", call: "呼叫",
    confidence: "置信度", saved: "已保存", note_applied: "已立即生效", note_restart: "重启服务后生效", wrong_login: "用户名或密码错误", rate_limited: "登录失败次数过多，请稍后再试",
    forbidden: "无权限", failed: "失败", no_gate: "未配置道闸", place: "地点", connected: "已连接", disconnected: "未连接",
    none: "无", s: "秒", min: "分", h: "小时", confirm_open: "确认开闸？", running: "运行中",
    k_sos: "紧急呼叫 SOS", k_fall: "跌倒", k_heart_rate_high: "心率过高", k_heart_rate_low: "心率过低", k_spo2_low: "血氧过低",
    k_removed: "手环摘除", k_low_battery: "手环电量低", k_no_signal: "手环无信号", k_left_compound: "离开小区",
    r_not_in_list: "不在住户名单", r_entry_expired: "登记已过期", r_entry_not_yet_valid: "登记未生效",
    r_low_confidence: "识别置信度低", r_too_few_reads: "识别次数不足", r_reads_disagree: "识别结果不一致", r_bad_format: "车牌格式不符",
    g_plate_match: "住户车辆", g_guard_room: "监控室开闸", g_visitor: "访客放行", g_cloud_command: "平台开闸",
    k_charger_cutoff: "充电桩断电", k_ebike_in_lift: "电动车进电梯", k_video_fall: "视频跌倒", k_thrown_object: "高空抛物",
  },
  en: {
    title: "Guard room", tab_alarms: "Alarms", tab_gate: "Gate", tab_cameras: "Cameras", tab_devices: "Devices",
    tab_installer: "Installer", sound_on: "Enable sound", logout: "Log out", login: "Log in", user: "User",
    password: "Password", active_alarms: "Active alarms", no_alarms: "No open alarms", gate_events: "Gate",
    plates: "Residents' plates", plate: "Plate", ref: "Resident", reason: "Kind", valid_until: "Valid until",
    uplink: "Uplink", class: "Class", unsent: "Unsent", oldest: "Oldest unsent", type: "Type", state: "State",
    last_poll: "Last poll", fault: "Fault", tasks: "Tasks not running", draw: "Draw a zone / line", zone: "Zone",
    line: "Line", clear: "Clear", save: "Save", draw_hint: "Click on the picture to place points (a zone needs 3 or more, a line 2).",
    doctor: "Checks", run_doctor: "Run checks", capabilities: "Capabilities", device_tests: "Device tests", test: "Test", check: "Check", result: "Result", detail: "Detail", ack: "Acknowledge",
    resolve: "Resolve", acked_by: "Acknowledged by", open_for: "Open for", level: "Level", count: "Count",
    device: "Device", open_gate: "Open gate", online: "online", offline: "offline", unknown: "unknown", never: "never",
    visitor: "Visitor", resident: "Resident", call: "Call", confidence: "confidence", saved: "Saved",
    note_applied: "applied now", note_restart: "restart the daemon to apply",
    wrong_login: "Wrong user or password", rate_limited: "Too many failed logins; try again later",
    forbidden: "Not allowed", failed: "Failed", no_gate: "No gate configured", place: "Place", connected: "connected",
    disconnected: "not connected", none: "none", s: "s", min: "min", h: "h", confirm_open: "Open the gate?",
    running: "running",
    k_sos: "SOS", k_fall: "Fall", k_heart_rate_high: "Heart rate high", k_heart_rate_low: "Heart rate low",
    r_not_in_list: "not a resident's plate", r_entry_expired: "entry expired", r_entry_not_yet_valid: "entry not yet valid",
    r_low_confidence: "read not sure enough", r_too_few_reads: "too few reads", r_reads_disagree: "reads disagree",
    r_bad_format: "not a plate's format",
    g_plate_match: "Resident's car", g_guard_room: "Opened by the guard room", g_visitor: "Visitor let in",
    g_cloud_command: "Opened by the platform",
    k_spo2_low: "Blood oxygen low", k_removed: "Wristband removed", k_low_battery: "Wristband battery low",
    k_no_signal: "Wristband silent", k_left_compound: "Left the compound", k_charger_cutoff: "Charger cut off",
    k_ebike_in_lift: "E-bike in lift", k_video_fall: "Fall (camera)", k_thrown_object: "Thrown object",
  },
};

let lang = localStorage.getItem("lang") === "en" ? "en" : "zh";
const t = (k) => (T[lang][k] !== undefined ? T[lang][k] : k);
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

const S = { session: null, state: null, tab: "alarms", clockSkewMs: 0, skewRttMs: Infinity, skewAt: 0, es: null,
  gateEvents: [], audio: null,
  alarmVersion: -1, epoch: null,  // of the alarms shown: pushes and state answers carry them, the newer wins
  answered: new Set() };  // gate calls answered on this screen (by event id)

function applyLang() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-t]").forEach((n) => { n.textContent = t(n.dataset.t); });
  $("lang").textContent = lang === "zh" ? "English" : "中文";
  document.title = t("title") + " · edgeagent";
  if (S.state) renderAll();
}

async function api(path, body) {
  const opts = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    if (S.session) opts.headers["X-CSRF-Token"] = S.session.csrf;
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  return { status: r.status, data };
}

// --- login -----------------------------------------------------------------------------------------

async function boot() {
  applyLang();
  const r = await api("/api/session");
  if (r.status === 200) start(r.data); else showLogin();
}

function showLogin() {
  if (S.es) { S.es.close(); S.es = null; }  // a logged-out screen stops asking the stream again
  S.session = null;
  S.state = null;
  S.gateEvents = [];
  S.alarmVersion = -1;
  S.epoch = null;
  $("login").hidden = false;
  $("tabs").hidden = true;
  $("logout").hidden = true;
  document.querySelectorAll(".page").forEach((p) => { p.hidden = true; });
  $("login-user").focus();
}

$("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  ensureAudio();  // a click is the gesture browsers want before they play sound
  const r = await api("/api/login", { user: $("login-user").value, password: $("login-pass").value });
  $("login-pass").value = "";
  if (r.status === 200) { $("login-error").textContent = ""; start(r.data); return; }
  $("login-error").textContent = r.status === 429 ? t("rate_limited") : t("wrong_login");
});

$("logout").addEventListener("click", async () => {
  await api("/api/logout", {});
  showLogin();
});

$("lang").addEventListener("click", () => {
  lang = lang === "zh" ? "en" : "zh";
  localStorage.setItem("lang", lang);
  applyLang();
});

function can(p) { return S.session && S.session.perms.includes(p); }

async function start(session) {
  S.session = session;
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = session.user + " (" + session.role + ")";
  document.querySelector('[data-tab="installer"]').hidden = !can("configure");
  showTab(S.tab);
  S.state = null;
  connect();
  await refresh();
  loadPlates();
}

// --- tabs --------------------------------------------------------------------------------------------

document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

function showTab(tab) {
  S.tab = tab;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("on", b.dataset.tab === tab));
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== "page-" + tab; });
  if (tab === "cameras") refreshCameras();
  if (tab === "installer") installerInit();
}

// --- state and the live feed ---------------------------------------------------------------------------

async function refresh() {
  const sent = Date.now();
  const r = await api("/api/state");
  const back = Date.now();
  if (r.status === 401) { showLogin(); return; }
  if (r.status !== 200) return;
  // The answer may be older than what the stream pushed meanwhile: keep the newer alarms, merge gate events.
  if (S.state && S.state.alarms && r.data.epoch === S.epoch && r.data.alarms_version < S.alarmVersion) {
    r.data.alarms = S.state.alarms;
  } else {
    S.epoch = r.data.epoch;
    S.alarmVersion = r.data.alarms_version;
  }
  S.state = r.data;
  // The box's clock against this screen's: server_time was read somewhere between sending and receiving, so the
  // midpoint is off by at most half the round trip. A reply delayed by a busy box (seconds under load) would
  // make every call look that much younger or older: the estimate from the quickest reply is kept (renewed
  // every few minutes, as the clocks drift).
  const rtt = back - sent;
  if (rtt <= S.skewRttMs || back - S.skewAt > 300000) {
    S.clockSkewMs = Date.parse(r.data.server_time) - (sent + back) / 2;
    S.skewRttMs = rtt;
    S.skewAt = back;
  }
  mergeGate(r.data.gate_events || []);
  renderAll();
}

function mergeGate(rows) {
  const byId = new Map();
  for (const e of [...S.gateEvents, ...rows]) if (!byId.has(e.id)) byId.set(e.id, e);
  S.gateEvents = [...byId.values()].sort((a, b) => (a.occurred_at < b.occurred_at ? 1 : -1)).slice(0, 30);
}

function pushedAlarms(msg) {
  if (msg.epoch === S.epoch && msg.version < S.alarmVersion) return;  // (another epoch: the daemon restarted)
  S.epoch = msg.epoch;
  S.alarmVersion = msg.version;
  S.state.alarms = msg.alarms || [];
  renderAlarms();
}

let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 300);
}

function connect() {
  if (S.es) S.es.close();
  const es = new EventSource("/api/events");
  S.es = es;
  es.addEventListener("hello", (m) => {
    $("conn").className = "dot on";
    if (!S.state) S.state = { alarms: [] };  // cards first; the full state follows
    pushedAlarms(JSON.parse(m.data));
    // Now, not after refreshSoon's pause: the stream only carries what happens from here on, and what happened
    // before it was connected (or while it reconnected) is only in the state.
    refresh();
  });
  es.addEventListener("alarms", (m) => {
    if (S.state) pushedAlarms(JSON.parse(m.data));
  });
  es.addEventListener("event", (m) => {
    const ev = JSON.parse(m.data);
    if (ev.type.startsWith("gate.")) {
      mergeGate([ev]);
      renderGate();
    }
    if (ev.type.startsWith("device.") || ev.type.startsWith("uplink.")) refreshSoon();
    if (ev.type.startsWith("alarm.")) refreshSoon();  // snapshots referenced by the event
  });
  es.onerror = () => {
    $("conn").className = "dot off";
    if (es.readyState === EventSource.CLOSED && S.es === es && S.session) setTimeout(() => { if (S.es === es) connect(); }, 2000);
  };
}

setInterval(() => { if (S.session) refresh(); }, 10000);
setInterval(() => { if (S.state) tickAlarms(); }, 1000);

function renderAll() {
  renderAlarms();
  renderGate();
  renderDevices();
  if (S.tab === "cameras") refreshCameras();
}

// --- alarms --------------------------------------------------------------------------------------------

function since(iso) {
  const s = Math.max(0, (Date.now() + S.clockSkewMs - Date.parse(iso)) / 1000);
  if (s < 60) return Math.floor(s) + " " + t("s");
  if (s < 3600) return Math.floor(s / 60) + " " + t("min") + " " + Math.floor(s % 60) + " " + t("s");
  return Math.floor(s / 3600) + " " + t("h") + " " + Math.floor((s % 3600) / 60) + " " + t("min");
}

// Cards are rebuilt from the data on every render, but a card whose content did not change keeps its element
// (and its place). Renders come often on a busy box (every device going on- or offline asks for the state
// again), and a card replaced between a press and its release loses the guard's click.
const SIG = new WeakMap();
function sign(card, key) {
  card.dataset.key = key;
  SIG.set(card, card.outerHTML);
  return card;
}
function keepCards(box, cards) {
  const old = new Map();
  for (const c of box.children) if (c.dataset.key !== undefined) old.set(c.dataset.key, c);
  const next = cards.map((c) => { const o = old.get(c.dataset.key); return o && SIG.get(o) === SIG.get(c) ? o : c; });
  next.forEach((c, i) => { if (box.children[i] !== c) box.insertBefore(c, box.children[i] || null); });
  while (box.children.length > next.length) box.lastElementChild.remove();
}

function kindLabel(kind) { const k = "k_" + kind; return T[lang][k] || kind; }

function renderAlarms() {
  const alarms = (S.state && S.state.alarms) || [];
  const box = $("alarm-cards");
  const cards = [];
  $("no-alarms").hidden = alarms.length > 0;
  $("alarm-count").textContent = alarms.length ? String(alarms.length) : "";
  for (const a of alarms) {
    const subject = a.resident_id ? (a.name ? a.name + " · " + a.resident_id : a.resident_id)
      : (a.place ? t("place") + ": " + a.place : a.device_id);
    const card = el("div", { class: "card alarm" + (a.acknowledged ? " acked" : ""), "data-alarm": a.id },
      el("h3", {}, el("span", { class: "kind" }, kindLabel(a.kind)), el("span", { class: "open", "data-since": a.raised_at })),
      el("div", { class: "subject" }, subject),
      el("div", { class: "meta" }, t("level") + " " + a.level + " · " + t("count") + " " + a.count + " · " + t("device") + " " + a.device_id),
      a.acknowledged ? el("div", { class: "meta acked-by" }, t("acked_by") + ": " + a.acknowledged_by + " (" + a.acknowledged_via + ")") : null,
      a.snapshot ? el("img", { src: "/api/evidence/" + a.snapshot + ".jpg", alt: "snapshot" }) : null);
    if (can("alarm")) {
      const actions = el("div", { class: "actions" });
      if (!a.acknowledged) actions.append(el("button", { class: "danger ack", on: { click: () => alarmAction(a.id, "ack") } }, t("ack")));
      actions.append(el("button", { class: "resolve", on: { click: () => alarmAction(a.id, "resolve") } }, t("resolve")));
      card.append(actions);
    }
    cards.push(sign(card, a.id));  // (signed without the time it has been open: that ticks by itself)
  }
  keepCards(box, cards);
  tickAlarms();
  updateSound();
}

function tickAlarms() {
  document.querySelectorAll("[data-since]").forEach((n) => { n.textContent = since(n.dataset.since); });
}

async function alarmAction(id, action) {
  const r = await api("/api/alarms/" + encodeURIComponent(id) + "/" + action, {});
  if (r.status !== 200) alert(t(r.status === 403 ? "forbidden" : "failed") + ": " + ((r.data && r.data.error && r.data.error.message) || r.status));
  refreshSoon();
}

// --- sound: a two-tone beep until every alarm is acknowledged (and while a gate call rings) -----------------

function ensureAudio() {
  if (!S.audio) {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (Ctx) S.audio = new Ctx();
  }
  if (S.audio && S.audio.state === "suspended") S.audio.resume();
}

$("sound").addEventListener("click", () => { ensureAudio(); updateSound(); });
document.addEventListener("click", () => { if (S.session && (!S.audio || S.audio.state !== "running")) { ensureAudio(); setTimeout(updateSound, 100); } });

let beepTimer = null;
function beep() {
  if (!S.audio || S.audio.state !== "running") return;
  const now = S.audio.currentTime;
  [880, 660].forEach((f, i) => {
    const o = S.audio.createOscillator();
    const g = S.audio.createGain();
    o.frequency.value = f;
    g.gain.value = 0.2;
    o.connect(g).connect(S.audio.destination);
    o.start(now + i * 0.25);
    o.stop(now + i * 0.25 + 0.2);
  });
}

// A call is answered once someone (on any screen, or the platform) commanded its gate after it rang.
function answered(call) {
  if (S.answered.has(call.id)) return true;
  const gate = (call.data || {}).gate;
  return S.gateEvents.some((e) => e.type === "gate.commanded" && e.device_id === gate && e.occurred_at >= call.occurred_at);
}

function ringing() {
  const open = ((S.state && S.state.alarms) || []).some((a) => !a.acknowledged);
  const calls = S.gateEvents.some((e) => e.type === "gate.call" && !answered(e) && Date.now() + S.clockSkewMs - Date.parse(e.occurred_at) < 60000);
  return open || calls;
}

function updateSound() {
  const on = ringing();
  document.body.dataset.sounding = on ? "1" : "0";
  // Browsers play sound only after a click on the page: the button shows until then (flashing while ringing).
  const silent = !S.audio || S.audio.state !== "running";
  $("sound").hidden = !(S.session && silent);
  $("sound").classList.toggle("danger", on && silent);
  if (on && !beepTimer) { beep(); beepTimer = setInterval(beep, 1000); }
  if (!on && beepTimer) { clearInterval(beepTimer); beepTimer = null; }
}

// --- gate ------------------------------------------------------------------------------------------------

function snapshotOf(ev) {
  const a = (ev.attachments || []).find((x) => x.media_type === "image/jpeg");
  return a ? "/api/evidence/" + a.sha256 + ".jpg" : null;
}

function renderGate() {
  const gates = (S.state && S.state.gates) || [];
  keepCards($("gate-buttons"), gates.map((g) => sign(can("gate")
    ? el("button", { class: "ok gate-open", "data-gate": g.id, on: { click: () => openGate(g.id, "guard_room") } }, t("open_gate") + " · " + (g.name || g.id))
    : el("span", { class: "meta" }, g.name || g.id), g.id)));
  const box = $("gate-cards");
  const cards = [];
  for (const ev of S.gateEvents.filter((e) => ["gate.visitor", "gate.call", "gate.commanded"].includes(e.type)).slice(0, 20)) {
    const d = ev.data || {};
    if (ev.type === "gate.commanded") {  // who opened it and why: a resident's plate, the guard room, the platform
      cards.push(sign(el("div", { class: "card" + (d.outcome === "executed" ? "" : " failed"), "data-event": ev.type },
        el("h3", {}, el("span", {}, (T[lang]["g_" + d.reason] || d.reason) + " · " + (d.command || "")),
          el("span", { class: "meta" }, new Date(ev.occurred_at).toLocaleTimeString(lang === "zh" ? "zh-CN" : "en-GB"))),
        el("div", { class: "meta" }, ev.device_id + " · " + d.by + " (" + d.via + ") · " + (d.outcome === "executed" ? "✓" : "✗ " + (d.error || ""))),
        d.note ? el("div", { class: "meta" }, d.note) : null), ev.id));
      continue;
    }
    const isCall = ev.type === "gate.call";
    const fresh = Date.now() + S.clockSkewMs - Date.parse(ev.occurred_at) < 60000;
    const card = el("div", { class: "card" + (isCall && fresh && !answered(ev) ? " ringing" : ""), "data-event": ev.type },
      el("h3", {}, el("span", {}, isCall ? t("call") : t("visitor")),
        el("span", { class: "meta" }, new Date(ev.occurred_at).toLocaleTimeString(lang === "zh" ? "zh-CN" : "en-GB"))),
      d.plate ? el("div", { class: "plate" }, d.plate) : null,
      d.confidence !== undefined ? el("div", { class: "meta" }, t("confidence") + " " + Math.round(Number(d.confidence) * 100) + "%"
        + (d.reason ? " · " + (T[lang]["r_" + d.reason] || d.reason) : "")) : null,
      el("div", { class: "meta" }, t("device") + " " + (d.gate || d.gate_id || ev.device_id)));
    const snap = snapshotOf(ev);
    if (snap) card.append(el("img", { src: snap, alt: "snapshot" }));
    const gate = d.gate || d.gate_id || (gates[0] && gates[0].id);
    if (can("gate") && gate) {
      card.append(el("div", { class: "actions" }, el("button", { class: "ok open-for", on: { click: () => { S.answered.add(ev.id); openGate(gate, "visitor", d.plate); } } }, t("open_gate"))));
    }
    cards.push(sign(card, ev.id));
  }
  keepCards(box, cards);
  updateSound();
}

async function openGate(id, reason, plate) {
  if (!confirm(t("confirm_open"))) return;
  const r = await api("/api/gates/" + encodeURIComponent(id) + "/open", { reason, note: plate || null });
  if (r.status !== 200) alert(t(r.status === 403 ? "forbidden" : "failed") + ": " + ((r.data && r.data.error && r.data.error.message) || r.status));
  renderGate();
}

async function loadPlates() {
  const r = await api("/api/plates");
  const body = document.querySelector("#plates tbody");
  body.replaceChildren();
  if (r.status !== 200) return;
  for (const p of r.data.plates) {
    body.append(el("tr", {}, el("td", { class: "plate-cell" }, p.plate), el("td", {}, p.ref || ""), el("td", {}, p.reason || ""),
      el("td", {}, p.valid_until ? p.valid_until.slice(0, 10) : "—")));
  }
}

// --- devices and uplink ------------------------------------------------------------------------------------

function renderDevices() {
  const st = S.state;
  if (!st) return;
  const up = st.uplink || {};
  $("uplink").textContent = (up.state || "?") + (up.broker ? " · " + up.broker : "") + (up.last_error ? " · " + up.last_error : "");
  const bl = document.querySelector("#backlog tbody");
  bl.replaceChildren();
  for (const [name, c] of Object.entries(st.outbox || {})) {
    bl.append(el("tr", {}, el("td", {}, name), el("td", {}, String(c.unsent)),
      el("td", {}, c.oldest_unsent_age_s === null ? "—" : Math.round(c.oldest_unsent_age_s) + " " + t("s"))));
  }
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const d of st.devices || []) {
    const online = d.online === true ? "online" : d.online === false ? "offline" : "unknown";
    body.append(el("tr", { "data-device": d.id }, el("td", {}, d.id), el("td", {}, d.type || ""),
      el("td", { class: online === "online" ? "ok" : online === "offline" ? "off" : "" }, t(online)),
      el("td", {}, d.last_poll_age_s === null || d.last_poll_age_s === undefined ? t("never") : d.last_poll_age_s.toFixed(1) + " " + t("s")),
      el("td", {}, d.last_error || "")));
  }
  for (const [id, c] of Object.entries(st.camera_status || {})) {
    const online = c.online === true ? "online" : c.online === false ? "offline" : "unknown";
    body.append(el("tr", { "data-device": id }, el("td", {}, id), el("td", {}, "camera"),
      el("td", { class: online === "online" ? "ok" : online === "offline" ? "off" : "" }, t(online)), el("td", {}, "—"), el("td", {}, c.error || "")));
  }
  const tasks = $("tasks");
  tasks.replaceChildren();
  for (const task of st.tasks || []) tasks.append(el("li", {}, task.name + ": " + task.state + (task.last_error ? " · " + task.last_error : "")));
  // Every capability's own status(), as it gives it: a new capability shows here without a page of its own.
  const caps = $("capabilities");
  const open = new Set([...caps.querySelectorAll("details[open]")].map((d) => d.dataset.cap));
  caps.replaceChildren();
  for (const [name, value] of Object.entries(st.capabilities || {})) {
    if (value === null || value === undefined) continue;
    const d = el("details", { "data-cap": name }, el("summary", {}, name), el("pre", {}, JSON.stringify(value, null, 1)));
    if (open.has(name)) d.open = true;
    caps.append(d);
  }
}

// --- cameras: the latest picture with zones, lines (and the detector's boxes, drawn by the box) -------------------

function drawShapes(ctx, w, h, cam, extra) {
  ctx.lineWidth = Math.max(2, w / 320);
  ctx.font = Math.round(w / 40) + "px sans-serif";
  for (const z of cam.zones || []) {
    ctx.strokeStyle = "#f5a524"; ctx.fillStyle = "rgba(245,165,36,0.15)";
    ctx.beginPath();
    z.points.forEach(([x, y], i) => (i ? ctx.lineTo(x * w, y * h) : ctx.moveTo(x * w, y * h)));
    ctx.closePath(); ctx.fill(); ctx.stroke();
    ctx.fillStyle = "#f5a524"; ctx.fillText(z.name, z.points[0][0] * w + 4, z.points[0][1] * h + 16);
  }
  for (const l of cam.lines || []) {
    ctx.strokeStyle = "#3e8ed0";
    ctx.beginPath(); ctx.moveTo(l.a[0] * w, l.a[1] * h); ctx.lineTo(l.b[0] * w, l.b[1] * h); ctx.stroke();
    ctx.fillStyle = "#3e8ed0"; ctx.fillText(l.name, l.a[0] * w + 4, l.a[1] * h - 6);
  }
  if (extra) extra(ctx, w, h);
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = url;
  });
}

let camTimer = null;
async function refreshCameras() {
  if (camTimer) { clearTimeout(camTimer); camTimer = null; }
  if (S.tab !== "cameras" || !S.state) return;
  const box = $("camera-views");
  for (const cam of S.state.cameras || []) {
    let card = box.querySelector('[data-camera="' + CSS.escape(cam.id) + '"]');
    if (!card) {
      card = el("div", { class: "card", "data-camera": cam.id }, el("h3", {}, el("span", {}, cam.name || cam.id), el("span", { class: "meta state" }, "")), el("canvas", { width: 640, height: 360 }));
      box.append(card);
    }
    const status = (S.state.camera_status || {})[cam.id] || {};
    card.querySelector(".state").textContent = t(status.online === true ? "online" : status.online === false ? "offline" : "unknown");
    try {
      const img = await loadImage("/api/cameras/" + encodeURIComponent(cam.id) + "/snapshot?boxes=1&t=" + Date.now());
      const c = card.querySelector("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      drawShapes(ctx, c.width, c.height, cam);
      card.dataset.drawn = "1";
    } catch (e) { card.dataset.drawn = "0"; }
  }
  camTimer = setTimeout(refreshCameras, 2000);
}

// --- installer: draw a zone or a line on a snapshot and save it to the config ------------------------------------

const I = { img: null, points: [], ready: false };

async function installerInit() {
  const sel = $("inst-camera");
  if (!I.ready) {
    I.ready = true;
    sel.addEventListener("change", installerLoad);
    $("inst-kind").addEventListener("change", () => { I.points = []; installerDraw(); });
    $("inst-clear").addEventListener("click", () => { I.points = []; installerDraw(); });
    $("inst-save").addEventListener("click", installerSave);
    $("doctor-run").addEventListener("click", runDoctor);
    $("inst-canvas").addEventListener("click", (ev) => {
      const c = ev.currentTarget;
      const r = c.getBoundingClientRect();
      const x = Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width));
      const y = Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height));
      if ($("inst-kind").value === "line" && I.points.length >= 2) I.points = [];
      I.points.push([Math.round(x * 1000) / 1000, Math.round(y * 1000) / 1000]);
      installerDraw();
    });
  }
  const tests = document.querySelector("#device-tests tbody");
  tests.replaceChildren();
  for (const d of (S.state && S.state.config_devices) || []) {
    const out = el("td", { class: "out" }, "");
    tests.append(el("tr", { "data-device": d.id }, el("td", {}, d.id), el("td", {}, d.type),
      el("td", {}, el("button", { class: "test", on: { click: () => deviceTest(d.id, out) } }, t("test"))), out));
  }
  const cams = (S.state && S.state.cameras) || [];
  const current = sel.value;
  sel.replaceChildren(...cams.map((c) => el("option", { value: c.id }, c.name || c.id)));
  if (current) sel.value = current;
  if (cams.length) installerLoad();
}

async function installerLoad() {
  const id = $("inst-camera").value;
  I.points = [];
  try {
    I.img = await loadImage("/api/cameras/" + encodeURIComponent(id) + "/snapshot?boxes=0&t=" + Date.now());
  } catch (e) { I.img = null; }
  installerDraw();
}

function installerDraw() {
  const c = $("inst-canvas");
  const ctx = c.getContext("2d");
  if (I.img) { c.width = I.img.naturalWidth; c.height = I.img.naturalHeight; ctx.drawImage(I.img, 0, 0); }
  else { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height); }
  const cam = ((S.state && S.state.cameras) || []).find((x) => x.id === $("inst-camera").value) || {};
  drawShapes(ctx, c.width, c.height, cam, (g, w, h) => {
    if (!I.points.length) return;
    g.strokeStyle = "#30a46c"; g.fillStyle = "#30a46c";
    g.beginPath();
    I.points.forEach(([x, y], i) => (i ? g.lineTo(x * w, y * h) : g.moveTo(x * w, y * h)));
    if ($("inst-kind").value === "zone" && I.points.length > 2) g.closePath();
    g.stroke();
    for (const [x, y] of I.points) { g.beginPath(); g.arc(x * w, y * h, Math.max(4, w / 160), 0, 7); g.fill(); }
  });
  c.dataset.points = String(I.points.length);
  c.dataset.loaded = I.img ? "1" : "0";
}

async function installerSave() {
  const kind = $("inst-kind").value;
  const name = $("inst-name").value.trim();
  const shape = kind === "zone" ? { name, points: I.points } : { name, a: I.points[0], b: I.points[1] };
  const r = await api("/api/cameras/" + encodeURIComponent($("inst-camera").value) + "/shapes", { kind, shape });
  const out = $("inst-result");
  if (r.status === 200) {
    out.className = "ok";
    const note = r.data.note_code ? t("note_" + r.data.note_code) : r.data.note;
    out.textContent = t("saved") + ": " + (r.data.path || "") + (note ? " · " + note : "");
    out.dataset.applied = r.data.applied ? "1" : "0";
    const cam = S.state.cameras.find((x) => x.id === $("inst-camera").value);
    if (cam && r.data.camera) { cam.zones = r.data.camera.zones; cam.lines = r.data.camera.lines; }
    I.points = [];
    installerDraw();
  } else {
    out.className = "error";
    out.textContent = t("failed") + ": " + ((r.data && r.data.error && r.data.error.message) || r.status);
  }
}

async function deviceTest(id, out) {
  out.className = "out";
  out.textContent = "…";
  const r = await api("/api/devices/" + encodeURIComponent(id) + "/test", {});
  const ok = r.status === 200 && r.data.ok;
  out.className = "out " + (ok ? "ok" : "fail");
  out.textContent = r.data ? (r.data.detail || (r.data.error && r.data.error.message) || "") : String(r.status);
}

async function runDoctor() {
  const body = document.querySelector("#doctor tbody");
  body.replaceChildren(el("tr", {}, el("td", { colspan: "3" }, "…")));
  const r = await api("/api/doctor");
  body.replaceChildren();
  if (r.status !== 200) { body.append(el("tr", {}, el("td", { colspan: "3", class: "fail" }, (r.data && r.data.error && r.data.error.message) || String(r.status)))); return; }
  for (const c of r.data.checks || []) body.append(el("tr", {}, el("td", {}, c.check || c.name), el("td", { class: c.status }, c.status), el("td", {}, c.detail)));
}

boot();
