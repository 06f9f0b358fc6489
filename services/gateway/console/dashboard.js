// The dashboard: NPS, CSAT, AHT and FCR by channel and day over the last 30 days, and the alert
// feed (the current alerts, then each new one as the stream delivers it).

import { lineChart } from './chart.js';
import { Unauthorized, api, channelName, clear, el, fmtDuration, fmtNumber, fmtTime, listen, session } from './common.js';

const $ = (id) => document.getElementById(id);
const METRICS = [
  ['nps', 'NPS', 'score, −100 to 100', (v) => fmtNumber(v, 0), [-100, 100]],
  ['csat', 'CSAT', '% satisfied', (v) => `${fmtNumber(v, 0)}%`, [0, 100]],
  ['aht_seconds', 'Average handle time', 'per handled contact', (v) => fmtDuration(v), [0, null]],
  ['fcr', 'First-contact resolution', '% resolved', (v) => `${fmtNumber(v, 0)}%`, [0, 100]],
];
const DAY = 86400000;
const state = { stream: null, seen: new Set() };

async function loadCharts() {
  const end = new Date();
  const start = new Date(end.getTime() - 30 * DAY);
  const params = new URLSearchParams();
  for (const [metric] of METRICS) params.append('metric', metric);
  params.set('startTime', start.toISOString());
  params.set('endTime', end.toISOString());
  params.set('granularity', 'day');
  params.set('groupBy', 'channel');
  $('status').textContent = 'Loading…';
  try {
    const answer = await api(`/api/v1/metrics/query?${params}`);
    const from = answer.startTime ? new Date(answer.startTime) : start;
    const to = answer.endTime ? new Date(answer.endTime) : end;
    $('range').textContent = `${fmtTime(from.toISOString())} to ${fmtTime(to.toISOString())}${answer.timeZone ? ` (${answer.timeZone})` : ''}`;
    const charts = clear($('charts'));
    for (const [metric, title, unit, format, domain] of METRICS) {
      const series = (answer.series || [])
        .filter((s) => s.metric === metric)
        .map((s) => ({
          label: channelName((s.group && s.group.channel) || 'all'),
          points: (s.points || [])
            .filter((p) => p.score && p.score.value !== undefined)
            .map((p) => ({
              time: new Date(p.startTime),
              value: Number(p.score.value),
              n: Number(p.score.sampleSize || 0),
              low: p.score.ciLow === undefined ? undefined : Number(p.score.ciLow),
              high: p.score.ciHigh === undefined ? undefined : Number(p.score.ciHigh),
            })),
        }))
        .filter((s) => s.points.length)
        .sort((a, b) => a.label.localeCompare(b.label));
      charts.append(el('section', { class: 'card', 'data-metric': metric }, lineChart({ title, unit, start: from, end: to, series, format, domain, seconds: metric === 'aht_seconds' })));
    }
    $('status').textContent = '';
  } catch (err) {
    if (err instanceof Unauthorized) throw err;
    $('status').textContent = `Could not load the metrics: ${err.message}`;
  }
}

function alertItem(a) {
  return el(
    'li',
    { class: 'alert', 'data-alert': a.name || '', 'data-interaction': a.interactionId || '' },
    el('strong', {}, a.ruleDisplayName || a.rule || 'Alert'),
    ` ${a.description || ''}`,
    el(
      'span',
      { class: 'muted small' },
      ` ${fmtTime(a.fireTime)}${a.agentId ? ` · agent ${a.agentId}` : ''}${a.queue ? ` · ${a.queue}` : ''}` +
        `${a.interactionId ? ` · conversation ${a.interactionId}` : ''}` +
        `${a.acknowledgedBy ? ` · acknowledged by ${a.acknowledgedBy}` : ''}`,
    ),
  );
}

function addAlert(a, { first }) {
  if (!a || (a.name && state.seen.has(a.name))) return;
  if (a.name) state.seen.add(a.name);
  const feed = $('feed');
  const empty = feed.querySelector('.empty');
  if (empty) empty.remove();
  const item = alertItem(a);
  if (first) feed.prepend(item);
  else feed.append(item);
  while (feed.children.length > 200) feed.lastElementChild.remove();
}

async function loadAlerts() {
  const answer = await api('/api/v1/alerts?includeAcknowledged=false');
  const feed = clear($('feed'));
  state.seen.clear();
  for (const a of (answer && answer.alerts) || []) addAlert(a, { first: false });
  if (!feed.children.length) feed.append(el('li', { class: 'muted empty' }, 'No open alerts.'));
  if (!state.stream) {
    state.stream = listen(
      '/api/v1/streams/alerts',
      ['alert', 'message'],
      (a) => addAlert(a, { first: true }),
      (where) => {
        const words = { live: 'Live: new alerts appear at the top', reconnecting: 'Reconnecting…', closed: 'Live updates stopped' };
        $('feed-state').textContent = words[where] || '';
      },
    );
  }
}

function main() {
  const gate = session({
    signInSection: $('sign-in'),
    appSection: $('app'),
    onSignedIn: () => {
      Promise.all([loadCharts(), loadAlerts()]).catch((err) => {
        if (err instanceof Unauthorized) gate.signedOut('Your session has ended; sign in again.');
        else $('status').textContent = `Could not load: ${err.message}`;
      });
    },
    onSignedOut: () => {
      if (state.stream) state.stream.close();
      state.stream = null;
    },
  });
  $('reload').addEventListener('click', () => loadCharts());
}

main();
