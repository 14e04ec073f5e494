// ernie-lora studio: one Alpine.js component (reactive state and forms) and uPlot (the loss chart).
// Every action is a call to the studio's JSON API; the pages only show what the server says.

async function api(path, options = {}) {
  const init = {method: options.method || "GET", headers: {}};
  if (options.body !== undefined) {
    init.body = JSON.stringify(options.body);
    init.headers["Content-Type"] = "application/json";
  }
  if (init.method !== "GET" && init.body === undefined) { init.body = "{}"; init.headers["Content-Type"] = "application/json"; }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = {detail: text}; }
  if (!response.ok) throw new Error((data && data.detail) || `${response.status} ${response.statusText}`);
  return data;
}

function flatten(config, prefix = "", out = {}) {
  for (const [key, value] of Object.entries(config || {})) {
    const dotted = prefix + key;
    if (value && typeof value === "object" && !Array.isArray(value)) flatten(value, dotted + ".", out);
    else out[dotted] = value;
  }
  return out;
}

function nest(flat) {
  const out = {};
  for (const [dotted, value] of Object.entries(flat)) {
    const parts = dotted.split(".");
    let node = out;
    for (const part of parts.slice(0, -1)) node = node[part] = node[part] || {};
    node[parts[parts.length - 1]] = value;
  }
  return out;
}

function studio() {
  return {
    pages: ["datasets", "jobs", "loras", "rank"], page: "datasets", status: "",
    // datasets
    datasets: [], ds: null, newDataset: "", resolution: 64, sel: null, caption: "", lint: {findings: [], rewrites: {}},
    check: null, dragOver: false, uploading: false, uploadDone: 0, uploadTotal: 0, uploadNote: "",
    // jobs
    jobs: [], job: null, presets: [], presetKey: "micro-demo", recipe: "train", jobName: "", jobDataset: "", jobDevice: "", devices: [], presetSeq: 0, presetLoaded: 0,
    fieldList: [], form: {}, touched: {}, problems: [], planText: "", vram: 24, chart: null, chartKey: "",
    // loras
    loras: [], strengths: {}, pgPrompts: "", pgSeed: 0, pgSteps: 20, pg: null, generating: false,
    rankDataset: "",

    async init() {
      const tab = location.hash.slice(1);
      if (this.pages.includes(tab)) this.page = tab;
      await this.refreshDatasets();
      [this.presets, this.devices] = await Promise.all([api("api/presets"), api("api/devices")]);
      await this.newJob();
      await this.refreshJobs();
      if (this.page === "loras") await this.refreshLoras();
      setInterval(() => this.poll(), 1000);
    },
    say(text) { this.status = text; },
    async guarded(fn) {
      try { return await fn(); } catch (e) { this.say("error: " + e.message); return undefined; }
    },
    async show(page) {
      this.page = page; location.hash = page;
      if (page === "loras") await this.refreshLoras();
      if (page === "jobs") await this.refreshJobs();
    },

    // ---- datasets ----
    async refreshDatasets() { this.datasets = await api("api/datasets"); },
    async createDataset() {
      await this.guarded(async () => {
        const made = await api("api/datasets", {method: "POST", body: {name: this.newDataset}});
        this.newDataset = "";
        await this.refreshDatasets();
        await this.openDataset(made.name);
        this.say(`dataset ${made.name} created`);
      });
    },
    async openDataset(name) {
      await this.guarded(async () => {
        this.ds = await api(`api/datasets/${encodeURIComponent(name)}?resolution=${this.resolution}`);
        this.check = null;
        if (this.sel) this.sel = this.ds.images.find((i) => i.name === this.sel.name) || null;
      });
    },
    upload(files) {
      const list = Array.from(files || []);
      if (!list.length || !this.ds) return;
      this.uploading = true; this.uploadDone = 0; this.uploadTotal = list.reduce((n, f) => n + f.size, 0);
      const failed = [];
      let done = 0, sent = 0;
      const one = (file) => new Promise((resolve) => {
        const xhr = new XMLHttpRequest();  // XHR for its upload progress events
        xhr.open("PUT", `api/datasets/${encodeURIComponent(this.ds.name)}/images/${encodeURIComponent(file.name)}/upload`);
        xhr.upload.onprogress = (e) => { this.uploadDone = sent + e.loaded; };
        xhr.onload = () => {
          if (xhr.status !== 200) { let d = xhr.responseText; try { d = JSON.parse(d).detail; } catch (e) {} failed.push(d); }
          sent += file.size; done += 1; this.uploadNote = `${done}/${list.length} uploaded`; resolve();
        };
        xhr.onerror = () => { failed.push(`${file.name}: upload failed`); sent += file.size; resolve(); };
        xhr.send(file);
      });
      (async () => {
        for (const file of list) await one(file);
        this.uploading = false;
        this.uploadNote = `${list.length - failed.length} of ${list.length} uploaded` + (failed.length ? "; " + failed.join("; ") : "");
        this.say(this.uploadNote);
        await this.openDataset(this.ds.name);
        await this.refreshDatasets();
      })();
    },
    async select(img) {
      this.sel = img; this.caption = img.caption || "";
      await this.lintCaption();
    },
    async lintCaption() { this.lint = await api("api/lint", {method: "POST", body: {text: this.caption}}); },
    async saveCaption() {
      await this.guarded(async () => {
        await api(`api/datasets/${encodeURIComponent(this.ds.name)}/images/${encodeURIComponent(this.sel.name)}/caption`,
                  {method: "PUT", body: {text: this.caption}});
        this.say(`caption of ${this.sel.name} saved`);
        await this.openDataset(this.ds.name);
      });
    },
    async autocaption(names) {
      await this.guarded(async () => {
        this.say("reading the text in the image(s)...");
        const result = await api(`api/datasets/${encodeURIComponent(this.ds.name)}/autocaption`,
                                 {method: "POST", body: {images: names, overwrite: names !== null}});
        const written = result.results.filter((r) => r.written).length;
        this.say(`auto-caption: ${written} of ${result.results.length} written`);
        await this.openDataset(this.ds.name);
        if (this.sel) { this.caption = this.sel.caption; await this.lintCaption(); }
      });
    },
    async replaceImage(file) {
      if (!file || !this.sel) return;
      await this.guarded(async () => {
        const stem = this.sel.name.replace(/\.[^.]+$/, "");
        const ext = file.name.includes(".") ? file.name.slice(file.name.lastIndexOf(".")) : "";
        const r = await fetch(`api/datasets/${encodeURIComponent(this.ds.name)}/images/${encodeURIComponent(stem + ext)}/upload?replace=true`,
                              {method: "PUT", body: file});
        if (!r.ok) throw new Error((await r.json()).detail);
        this.say(`${this.sel.name} replaced`);
        await this.openDataset(this.ds.name);
      });
    },
    async deleteImage() {
      if (!this.sel || !confirm(`Delete ${this.sel.name} and its caption?`)) return;
      await this.guarded(async () => {
        await api(`api/datasets/${encodeURIComponent(this.ds.name)}/images/${encodeURIComponent(this.sel.name)}`, {method: "DELETE"});
        this.sel = null;
        await this.openDataset(this.ds.name);
        await this.refreshDatasets();
      });
    },
    async checkDataset() {
      await this.guarded(async () => {
        this.check = await api(`api/datasets/${encodeURIComponent(this.ds.name)}/check?resolution=${this.resolution}`);
      });
    },

    // ---- jobs: the form ----
    get fieldGroups() {
      const groups = {};
      for (const f of this.fieldList) {
        const name = f.key.includes(".") ? f.key.split(".")[0] : "general";
        (groups[name] = groups[name] || []).push(f);
      }
      return Object.entries(groups).map(([name, fields]) => ({name, fields}));
    },
    async newJob() {
      this.job = null;
      if (!this.jobDataset && this.datasets.length) this.jobDataset = (this.ds && this.ds.name) || this.datasets[0].name;
      await this.applyPreset();
    },
    async applyPreset(config = null) {
      const preset = this.presets.find((p) => p.key === this.presetKey);
      if (!preset) return;
      const seq = ++this.presetSeq;  // a preset chosen while another loads: only the last one fills the form
      const fieldList = await api(`api/fields/${preset.recipe}`);
      if (seq !== this.presetSeq) return;
      this.recipe = preset.recipe;
      this.fieldList = fieldList;
      const given = flatten(config || preset.config);
      this.form = {}; this.touched = {};
      for (const f of this.fieldList) this.form[f.key] = f.key in given ? given[f.key] : f.default;
      for (const key of Object.keys(given)) this.touched[key] = true;
      if (!this.jobName || this.jobName.startsWith("job-")) this.jobName = `job-${Date.now() % 100000}`;
      this.planText = "";
      this.presetLoaded = seq;
      await this.validateJob();
    },
    setField(f, raw) {
      let value = raw;
      if (f.type === "integer") value = raw === "" ? null : parseInt(raw, 10);
      else if (f.type === "number") value = raw === "" ? null : parseFloat(raw);
      else if (f.type === "enum") value = raw === "" ? null : raw;
      else if (f.type === "json") { try { value = JSON.parse(raw); } catch (e) { value = raw; } }
      this.form[f.key] = value; this.touched[f.key] = true;
      this.validateJob();
    },
    config() {
      const flat = {};
      for (const key of Object.keys(this.touched)) if (key in this.form) flat[key] = this.form[key];
      return nest(flat);
    },
    problemFor(key) { const p = this.problems.find((p) => p.key === key); return p ? p.message : ""; },
    async validateJob() {
      const result = await this.guarded(() => api("api/jobs/validate", {method: "POST",
        body: {recipe: this.recipe, dataset: this.recipe === "train" ? this.jobDataset : "", config: this.config()}}));
      if (result) this.problems = result.problems;
    },
    async planJob() {
      this.planText = "planning (loads the model's shapes, a few seconds)...";
      const result = await this.guarded(() => api("api/jobs/plan", {method: "POST",
        body: {recipe: this.recipe, dataset: this.jobDataset, config: this.config(), vram: this.vram || null}}));
      this.planText = result ? result.text : "";
    },
    async startJob() {
      await this.guarded(async () => {
        const made = await api("api/jobs", {method: "POST", body: {name: this.jobName, recipe: this.recipe,
          preset: this.presetKey, dataset: this.recipe === "train" ? this.jobDataset : "", device: this.jobDevice,
          config: this.config()}});
        this.jobName = "";
        this.say(`job ${made.name} queued`);
        await this.refreshJobs();
        await this.openJob(made.id);
      });
    },

    // ---- jobs: the live view ----
    async refreshJobs() { this.jobs = await api("api/jobs"); },
    async openJob(id) {
      await this.guarded(async () => { this.job = await api(`api/jobs/${id}`); this.drawChart(); });
    },
    jobLine(j) {
      const parts = [`step ${j.step}` + (j.total ? ` of ${j.total}` : "")];
      if (j.loss !== null && j.loss !== undefined) parts.push(`loss ${j.loss.toFixed(4)}`);
      if (j.s_per_step) parts.push(`${j.s_per_step.toFixed(3)} s/it`);
      if (j.eta_s !== null && j.eta_s !== undefined && j.state === "running") parts.push(`ETA ${Math.round(j.eta_s)} s`);
      if (j.ran_on) parts.push(`on ${j.ran_on}`);
      return parts.join(" · ");
    },
    async jobAction(action) {
      await this.guarded(async () => {
        this.job = {...this.job, ...(await api(`api/jobs/${this.job.id}/${action}`, {method: "POST"}))};
        this.say(`${this.job.name}: ${action}`);
        await this.refreshJobs();
      });
    },
    async cloneJob() {
      await this.guarded(async () => {
        const copy = await api(`api/jobs/${this.job.id}/clone`, {method: "POST"});
        this.job = null;
        if (copy.preset) this.presetKey = copy.preset;
        this.jobDataset = copy.dataset;
        this.jobDevice = copy.device || "";
        this.jobName = copy.name;
        const config = copy.config;
        if (copy.recipe === "train" && config.data) delete config.data.path;
        await this.applyPreset(config);
        this.jobName = copy.name;
      });
    },
    drawChart() {
      const el = document.getElementById("loss-chart");
      if (!this.job || !el || typeof uPlot === "undefined") return;
      const losses = this.job.losses || [];
      const key = `${this.job.id}:${losses.length}`;
      if (key === this.chartKey) return;
      this.chartKey = key;
      const data = [losses.map((p) => p[0]), losses.map((p) => p[1])];
      if (this.chart && this.chart.jobId === this.job.id) { this.chart.setData(data); return; }
      if (this.chart) this.chart.destroy();
      this.chart = new uPlot({title: "loss", width: Math.min(760, el.clientWidth || 760), height: 240,
        scales: {x: {time: false}}, series: [{label: "step"}, {label: "loss", stroke: "#4a7bd0", width: 1.5}]}, data, el);
      this.chart.jobId = this.job.id;
    },
    async poll() {
      if (this.page !== "jobs") return;
      try {
        this.jobs = await api("api/jobs");
        if (this.job) {
          const summary = this.jobs.find((j) => j.id === this.job.id);
          if (summary && (["running", "stopping", "queued"].includes(summary.state) || summary.state !== this.job.state
                          || summary.step !== this.job.step)) {
            this.job = await api(`api/jobs/${this.job.id}`);
            this.drawChart();
          }
        }
      } catch (e) { this.say("studio unreachable: " + e.message); }
    },

    // ---- LoRAs ----
    async refreshLoras() {
      await this.guarded(async () => {
        this.loras = await api("api/loras");
        for (const l of this.loras) { const k = l.run + "/" + l.file; if (!(k in this.strengths)) this.strengths[k] = l.file === "lora.safetensors" ? 1.0 : 0; }
        if (!this.pgPrompts) this.pgPrompts = 'a poster with title "OPEN DAY", title band at the top, centered layout, purple theme';
      });
    },
    scoreLine(s) {
      const parts = [];
      if (s.layout !== null) parts.push(`layout ${s.layout} (structure ${s.structure}, colour ${s.colour})`);
      if (s.text !== null) parts.push(`text ${s.text}`);
      return parts.length ? parts.join(", ") : "(nothing in this prompt to score)";
    },
    async heldOutPrompts() {
      await this.guarded(async () => {
        const run = (this.loras.find((l) => !l.error && this.strengths[l.run + "/" + l.file]) || {}).run || "";
        const set = await api(`api/playground/prompts?count=6&run=${encodeURIComponent(run)}`);
        this.pgPrompts = set.prompts.join("\n");
        this.say(`${set.prompts.length} held-out prompts` + (set.checked_against ? `, none a caption of ${set.checked_against}` : ""));
      });
    },
    async generate() {
      this.generating = true;
      const prompts = this.pgPrompts.split("\n").map((p) => p.trim()).filter((p) => p);
      this.say(`generating ${prompts.length} prompt(s) before and after...`);
      await this.guarded(async () => {
        const loras = this.loras.filter((l) => !l.error && this.strengths[l.run + "/" + l.file])
          .filter((l) => l.file === "lora.safetensors")
          .map((l) => ({run: l.run, strength: this.strengths[l.run + "/" + l.file]}));
        this.pg = await api("api/playground", {method: "POST", body: {prompts, loras, seed: this.pgSeed, steps: this.pgSteps}});
        this.say(`generated ${prompts.length} prompt(s) with ${loras.length} LoRA(s)`);
      });
      this.generating = false;
    },
  };
}
