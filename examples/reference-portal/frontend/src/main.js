// The reference portal's page: log in (auth service), list and submit jobs (api service),
// job states live over the websocket (ws service). Plain DOM, no framework; data goes
// into the page with textContent only (never innerHTML).
import './style.css'

const $ = (id) => document.getElementById(id)
const jobs = new Map() // job id -> {name, state}
// The last state the websocket reported per job id, also for jobs not listed yet: the
// change for a job just submitted can arrive before the answer to its POST.
const seen = new Map()

async function call(method, path, body) {
  const r = await fetch(path, {
    method,
    credentials: 'same-origin', // the `sid` cookie: the session lives in Redis
    headers: body ? { 'Content-Type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  })
  const doc = await r.json().catch(() => ({}))
  return { status: r.status, doc }
}

// ------------------------------------------------------------------------ login

async function start() {
  const { status, doc } = await call('GET', '/auth/me')
  if (status === 200) return loggedIn(doc.user)
  $('login').hidden = false
}

$('login').addEventListener('submit', async (e) => {
  e.preventDefault()
  const f = new FormData(e.target)
  const { status, doc } = await call('POST', '/auth/login', {
    username: f.get('username'),
    password: f.get('password'),
  })
  $('login-error').textContent = status === 200 ? '' : doc.error || `HTTP ${status}`
  if (status === 200) loggedIn(doc.user)
})

$('logout').addEventListener('click', async () => {
  await call('POST', '/auth/logout', {})
  location.reload()
})

async function loggedIn(user) {
  $('login').hidden = true
  $('jobs').hidden = false
  $('logout').hidden = false
  $('who').textContent = user
  const { status, doc } = await call('GET', '/api/jobs')
  if (status === 200) {
    for (const j of doc.jobs) jobs.set(j.job_id, { name: j.name, state: j.state || '…' })
  }
  render()
  live.connect()
}

// ------------------------------------------------------------------------- jobs

// One request id per submission, kept across retries: the server looks it up in
// squeue/sacct before running sbatch again, so a retry never queues a second job.
async function submit(name, seconds) {
  const request_id = crypto.randomUUID()
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      const { status, doc } = await call('POST', '/api/jobs', { request_id, name, seconds })
      if (status === 200) return doc
      if (status !== 409 && status !== 503 && status !== 502) throw new Error(doc.error || `HTTP ${status}`)
    } catch (err) {
      if (!(err instanceof TypeError)) throw err // TypeError: network failure, retry
    }
    await new Promise((ok) => setTimeout(ok, 1000 * 2 ** attempt))
  }
  throw new Error('the portal did not answer; try again later')
}

$('submit').addEventListener('submit', async (e) => {
  e.preventDefault()
  const f = new FormData(e.target)
  $('submit-error').textContent = ''
  try {
    const doc = await submit(String(f.get('name')), Number(f.get('seconds')))
    if (!jobs.has(doc.job_id)) {
      jobs.set(doc.job_id, { name: String(f.get('name')), state: seen.get(doc.job_id) || 'SUBMITTED' })
    }
    render()
  } catch (err) {
    $('submit-error').textContent = err.message
  }
})

function render() {
  const rows = [...jobs.entries()].sort((a, b) => Number(b[0]) - Number(a[0]))
  $('job-rows').replaceChildren(
    ...rows.map(([id, j]) => {
      const tr = document.createElement('tr')
      for (const text of [id, j.name, j.state]) {
        const td = document.createElement('td')
        td.textContent = text
        tr.append(td)
      }
      tr.lastChild.className = `state-${j.state}`
      return tr
    }),
  )
}

// -------------------------------------------------------------------- websocket

// Messages: {type: "job", seq, job_id, state} for each change; {type: "snapshot", seq,
// jobs: {id: state}} after a hello whose last_seq is behind; {type: "uptodate", seq}.
// Snapshots and uptodate say "live": false while the server's state store is failing
// over (the socket stays open; {type: "status", live} announces it), then a snapshot.
// The last sequence seen survives reconnects (to this server or another one), so a
// reconnect resynchronises instead of missing the changes made meanwhile.
const live = {
  lastSeq: 0,
  retry: 0,
  ws: null,
  connect() {
    const proto = location.protocol === 'https:' ? 'wss' : 'ws'
    const ws = new WebSocket(`${proto}://${location.host}/ws/`)
    this.ws = ws
    ws.onopen = () => {
      this.retry = 0
      $('live').textContent = 'live'
      $('live').classList.add('on')
      ws.send(JSON.stringify({ type: 'hello', last_seq: this.lastSeq }))
    }
    ws.onmessage = (e) => this.receive(JSON.parse(e.data))
    ws.onclose = () => {
      $('live').textContent = 'reconnecting'
      $('live').classList.remove('on')
      // Back off 1, 2, 4 ... 15 s with jitter: a restarted server is not stormed.
      const delay = Math.min(15000, 1000 * 2 ** this.retry++) * (0.5 + Math.random() / 2)
      setTimeout(() => this.connect(), delay)
    }
  },
  receive(msg) {
    if (typeof msg.live === 'boolean') {
      $('live').textContent = msg.live ? 'live' : 'updates paused'
      $('live').classList.toggle('on', msg.live)
    }
    if (msg.type === 'snapshot') {
      for (const [id, state] of Object.entries(msg.jobs)) {
        seen.set(id, state)
        if (jobs.has(id)) jobs.get(id).state = state
      }
      this.lastSeq = msg.seq
    } else if (msg.type === 'job') {
      if (msg.seq <= this.lastSeq) return // already seen (a replay)
      if (msg.seq > this.lastSeq + 1) {
        // A gap: ask for the current state instead of guessing.
        this.ws.send(JSON.stringify({ type: 'hello', last_seq: this.lastSeq }))
        return
      }
      this.lastSeq = msg.seq
      seen.set(msg.job_id, msg.state)
      if (jobs.has(msg.job_id)) jobs.get(msg.job_id).state = msg.state
    }
    render()
  },
}

start()
