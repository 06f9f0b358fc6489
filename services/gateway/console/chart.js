// Line charts as inline SVG, built with DOM calls (no library, nothing inserted as markup).

import { el, fmtNumber } from './common.js';

const W = 640;
const H = 260;
const PAD = { left: 52, right: 16, top: 14, bottom: 34 };

function niceStep(span, seconds) {
  const raw = span / 5;
  if (seconds && raw >= 20) {
    for (const m of [30, 60, 120, 300, 600, 900, 1800, 3600, 7200]) if (raw <= m) return m;
  }
  const mag = 10 ** Math.floor(Math.log10(raw || 1));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

/**
 * series: [{ label, points: [{ time: Date, value: number, n: number, low?, high? }] }]; `seconds` puts the
 * axis ticks on whole minutes; `domain` ([min, max], either may be null) fixes the axis ends a metric has
 * by definition (0-100 for a percentage), so one point does not make a meaningless scale.
 * Returns a <figure> with the SVG, a legend and the same data as a table for screen readers.
 */
export function lineChart({ title, unit, start, end, series, format = (v) => fmtNumber(v), seconds = false, domain }) {
  const values = series.flatMap((s) => s.points.map((p) => p.value)).filter((v) => Number.isFinite(v));
  const figure = el('figure', { class: 'chart' });
  figure.append(el('figcaption', {}, title, unit ? el('span', { class: 'unit' }, ` (${unit})`) : null));
  if (!values.length) {
    figure.append(el('p', { class: 'empty' }, 'No data in this range.'));
    return figure;
  }
  let lo = domain && domain[0] !== null ? domain[0] : Math.min(...values);
  let hi = domain && domain[1] !== null ? domain[1] : Math.max(...values);
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const step = niceStep(hi - lo, seconds);
  lo = Math.floor(lo / step) * step;
  hi = Math.ceil(hi / step) * step;
  const t0 = start.getTime();
  const t1 = Math.max(end.getTime(), t0 + 1);
  const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - ((v - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom);

  const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title} by channel, by day` });
  svg.append(el('title', {}, title));
  const grid = el('g', { class: 'axes' });
  for (let v = lo; v <= hi + step / 2; v += step) {
    grid.append(el('line', { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    grid.append(el('text', { x: PAD.left - 6, y: y(v) + 4, 'text-anchor': 'end' }, format(v)));
  }
  const days = Math.max(1, Math.round((t1 - t0) / 86400000));
  const every = Math.ceil(days / 6);
  for (let d = 0; d <= days; d += every) {
    const t = t0 + d * 86400000;
    const label = new Date(t).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
    grid.append(el('text', { x: x(t), y: H - PAD.bottom + 18, 'text-anchor': 'middle' }, label));
  }
  svg.append(grid);

  series.forEach((s, i) => {
    const g = el('g', { class: `series series-${i % 8}` });
    const pts = s.points.filter((p) => Number.isFinite(p.value));
    if (pts.length > 1) {
      g.append(el('polyline', { points: pts.map((p) => `${x(p.time.getTime())},${y(p.value)}`).join(' ') }));
    }
    for (const p of pts) {
      const dot = el('circle', { cx: x(p.time.getTime()), cy: y(p.value), r: 3 });
      dot.append(el('title', {}, `${s.label} ${p.time.toLocaleDateString()}: ${format(p.value)} (n=${p.n})`));
      g.append(dot);
    }
    svg.append(g);
  });
  figure.append(svg);

  const legend = el('ul', { class: 'legend' });
  series.forEach((s, i) => legend.append(el('li', { class: `series-${i % 8}` }, el('span', { class: 'swatch' }), s.label)));
  figure.append(legend);

  const rows = series.flatMap((s) =>
    s.points.map((p) =>
      el(
        'tr',
        {},
        el('td', {}, s.label),
        el('td', {}, p.time.toLocaleDateString()),
        el('td', {}, format(p.value)),
        el('td', {}, String(p.n)),
        el('td', {}, p.low !== undefined && p.high !== undefined ? `${format(p.low)} – ${format(p.high)}` : ''),
      ),
    ),
  );
  figure.append(
    el(
      'details',
      {},
      el('summary', {}, 'Data as a table'),
      el(
        'div',
        { class: 'table-wrap' },
        el(
          'table',
          {},
          el(
            'thead',
            {},
            el('tr', {}, ...['Channel', 'Day', 'Value', 'Sample size', '95% CI'].map((h) => el('th', { scope: 'col' }, h))),
          ),
          el('tbody', {}, rows),
        ),
      ),
    ),
  );
  return figure;
}

/** A small sentiment sparkline (-1..1) with a zero line. */
export function sparkline(points, label) {
  const w = 240;
  const h = 60;
  const svg = el('svg', { viewBox: `0 0 ${w} ${h}`, role: 'img', 'aria-label': label, class: 'sparkline' });
  svg.append(el('line', { class: 'zero', x1: 0, x2: w, y1: h / 2, y2: h / 2 }));
  const n = points.length;
  const xs = (i) => (n === 1 ? w / 2 : 6 + (i / (n - 1)) * (w - 12));
  const ys = (v) => h / 2 - Math.max(-1, Math.min(1, v)) * (h / 2 - 6);
  if (n > 1) svg.append(el('polyline', { points: points.map((p, i) => `${xs(i)},${ys(p)}`).join(' ') }));
  points.forEach((p, i) => svg.append(el('circle', { cx: xs(i), cy: ys(p), r: 3, class: p < 0 ? 'neg' : 'pos' })));
  return svg;
}
