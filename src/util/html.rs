//! Self-contained static report pages: HTML with inline SVG charts drawn as real text (no
//! scripts from the network, no build step, no bitmap font), and a small inline script that
//! sorts tables. Used by `infer` (`report.html` beside `report.json`) and by training runs.

use std::fmt::Write as _;

/// Escape text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;\
color:#1b1f24;max-width:1100px}h1{font-size:22px}h2{font-size:17px;margin-top:28px}\
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #d8dee4;\
padding:4px 10px;text-align:left}th{cursor:pointer;background:#f3f5f7;user-select:none}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.kv td:first-child{color:#57606a}\
img.t{height:72px;image-rendering:auto}svg text{font-size:12px;fill:#1b1f24}\
.note{color:#57606a;font-size:13px}";

const SORT_JS: &str = "document.querySelectorAll('table.sortable').forEach(function(t){\
var hs=t.querySelectorAll('th');hs.forEach(function(h,i){h.addEventListener('click',function(){\
var b=t.tBodies[0],rs=Array.prototype.slice.call(b.rows),asc=h.dataset.asc!=='1';\
hs.forEach(function(x){delete x.dataset.asc});if(asc)h.dataset.asc='1';\
rs.sort(function(a,c){var x=a.cells[i].dataset.v||a.cells[i].textContent,\
y=c.cells[i].dataset.v||c.cells[i].textContent,nx=parseFloat(x),ny=parseFloat(y);\
var r=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?r:-r});\
rs.forEach(function(r){b.appendChild(r)})})})});";

/// A page under construction.
pub struct Page {
    body: String,
    title: String,
}

impl Page {
    pub fn new(title: &str) -> Self {
        Page {
            body: format!("<h1>{}</h1>\n", esc(title)),
            title: title.to_string(),
        }
    }

    pub fn h2(&mut self, t: &str) {
        let _ = writeln!(self.body, "<h2>{}</h2>", esc(t));
    }

    pub fn note(&mut self, t: &str) {
        let _ = writeln!(self.body, "<p class=\"note\">{}</p>", esc(t));
    }

    /// A two-column key/value table.
    pub fn key_values(&mut self, rows: &[(String, String)]) {
        self.body.push_str("<table class=\"kv\"><tbody>\n");
        for (k, v) in rows {
            let _ = writeln!(self.body, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
        }
        self.body.push_str("</tbody></table>\n");
    }

    /// Raw, already safe HTML (an SVG from this module, a table from [`Table`]).
    pub fn raw(&mut self, html: &str) {
        self.body.push_str(html);
        self.body.push('\n');
    }

    pub fn finish(self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title>\
             <style>{STYLE}</style></head><body>\n{}<script>{SORT_JS}</script></body></html>\n",
            esc(&self.title),
            self.body
        )
    }
}

/// One cell: shown HTML and an optional sort key.
pub enum Cell {
    Text(String),
    /// A number shown with `decimals`, sorted numerically.
    Num(f64, usize),
    /// An image link (relative path), shown as a thumbnail.
    Img(String),
}

/// A sortable table (click a header to sort; numbers sort as numbers).
pub struct Table {
    pub id: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn html(&self) -> String {
        let mut s = format!(
            "<table class=\"sortable\" id=\"{}\"><thead><tr>",
            esc(&self.id)
        );
        for h in &self.headers {
            let _ = write!(s, "<th>{}</th>", esc(h));
        }
        s.push_str("</tr></thead><tbody>\n");
        for r in &self.rows {
            s.push_str("<tr>");
            for c in r {
                match c {
                    Cell::Text(t) => {
                        let _ = write!(s, "<td>{}</td>", esc(t));
                    }
                    Cell::Num(v, d) => {
                        let _ = write!(s, "<td class=\"n\" data-v=\"{v}\">{v:.d$}</td>");
                    }
                    Cell::Img(p) => {
                        let p = esc(p);
                        let _ = write!(
                            s,
                            "<td><a href=\"{p}\"><img class=\"t\" loading=\"lazy\" src=\"{p}\" alt=\"{p}\"></a></td>"
                        );
                    }
                }
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</tbody></table>");
        s
    }
}

const W: f64 = 640.0;
const H: f64 = 260.0;
const ML: f64 = 52.0;
const MR: f64 = 16.0;
const MT: f64 = 14.0;
const MB: f64 = 40.0;
/// Room right of a line chart for its legend.
const LEGEND_W: f64 = 240.0;

/// How a chart labels its axes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AxisFormat {
    /// The x values are counts (epochs, steps): ticks only at whole numbers.
    pub x_integer: bool,
    /// y ticks in scientific notation (learning rates: `2.0e-4`, not `0.000`).
    pub y_scientific: bool,
}

/// Up to five tick values over `[lo, hi]`: evenly spaced, or whole numbers only.
fn ticks(lo: f64, hi: f64, integer: bool) -> Vec<f64> {
    if !integer {
        return (0..=4).map(|i| lo + (hi - lo) * i as f64 / 4.0).collect();
    }
    let step = ((hi - lo) / 4.0).ceil().max(1.0);
    let first = lo.ceil();
    (0..=5)
        .map(|i| first + step * i as f64)
        .take_while(|v| *v <= hi + 1e-9)
        .collect()
}

fn axis_frame(s: &mut String, x_label: &str, y_label: &str, x: (f64, f64), y: (f64, f64)) {
    axis_frame_with(s, (x_label, y_label), x, y, AxisFormat::default())
}

fn axis_frame_with(
    s: &mut String,
    (x_label, y_label): (&str, &str),
    x: (f64, f64),
    y: (f64, f64),
    fmt: AxisFormat,
) {
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let _ = write!(
        s,
        "<rect x=\"{ML}\" y=\"{MT}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#8c959f\"/>"
    );
    for yv in ticks(y.0, y.1, false) {
        let py = MT + ph * (1.0 - (yv - y.0) / (y.1 - y.0));
        let label = if fmt.y_scientific {
            format!("{yv:.1e}")
        } else {
            tick(yv)
        };
        let _ = write!(
            s,
            "<line x1=\"{ML}\" x2=\"{}\" y1=\"{py}\" y2=\"{py}\" stroke=\"#eaeef2\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            ML + pw,
            ML - 6.0,
            py + 4.0,
            label
        );
    }
    for xv in ticks(x.0, x.1, fmt.x_integer) {
        let px = ML + pw * (xv - x.0) / (x.1 - x.0);
        let label = if fmt.x_integer {
            format!("{xv:.0}")
        } else {
            tick(xv)
        };
        let _ = write!(
            s,
            "<text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            MT + ph + 16.0,
            label
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\
         <text transform=\"translate(14 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        ML + pw / 2.0,
        H - 6.0,
        esc(x_label),
        MT + ph / 2.0,
        esc(y_label)
    );
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() < 1e6) {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A histogram of `values` over `[lo, hi]` in `bins` bars.
pub fn histogram_svg(values: &[f64], lo: f64, hi: f64, bins: usize, x_label: &str) -> String {
    let bins = bins.max(1);
    let mut counts = vec![0usize; bins];
    for &v in values.iter().filter(|v| v.is_finite()) {
        let f = ((v - lo) / (hi - lo).max(1e-12)).clamp(0.0, 1.0);
        let b = ((f * bins as f64) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let mut s = format!(
        "<svg class=\"chart\" role=\"img\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">"
    );
    axis_frame(&mut s, x_label, "images", (lo, hi), (0.0, top));
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let bw = pw / bins as f64;
    for (i, &c) in counts.iter().enumerate() {
        let h = ph * c as f64 / top;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#4c8bf5\"><title>{c}</title></rect>",
            ML + bw * i as f64 + 1.0,
            MT + ph - h,
            (bw - 2.0).max(1.0)
        );
    }
    s.push_str("</svg>");
    s
}

/// Line chart of named series of `(x, y)` points (non-finite points are left out).
pub fn lines_svg(series: &[(&str, Vec<(f64, f64)>)], x_label: &str, y_label: &str) -> String {
    lines_svg_with(series, x_label, y_label, AxisFormat::default())
}

/// [`lines_svg`] with the axes labelled as `fmt` says.
pub fn lines_svg_with(
    series: &[(&str, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
    fmt: AxisFormat,
) -> String {
    const COLOURS: [&str; 6] = [
        "#4c8bf5", "#e8710a", "#1e8e3e", "#d93025", "#9334e6", "#5f6368",
    ];
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 <= 1e-12 * y0.abs().max(1e-300) {
        // A constant series (one learning rate): a band of ±10% around it.
        let pad = if y0 == 0.0 { 1.0 } else { 0.1 * y0.abs() };
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    // The legend sits to the right of the plot, one line per series.
    let wl = W + LEGEND_W;
    let hl = H.max(MT + 16.0 * series.len() as f64 + 8.0);
    let mut s = format!(
        "<svg class=\"chart\" role=\"img\" width=\"{wl}\" height=\"{hl}\" viewBox=\"0 0 {wl} {hl}\">"
    );
    axis_frame_with(&mut s, (x_label, y_label), (x0, x1), (y0, y1), fmt);
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    for (k, (name, p)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let (lx, ly) = (W + 4.0, MT + 8.0 + 16.0 * k as f64);
        let path: Vec<String> = p
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    ML + pw * (x - x0) / (x1 - x0),
                    MT + ph * (1.0 - (y - y0) / (y1 - y0))
                )
            })
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\
             <line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"3\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            path.join(" "),
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(name),
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_text_and_charts_carry_real_text() {
        let mut p = Page::new("mDice <report> & \"more\"");
        p.raw(&histogram_svg(
            &[0.1, 0.5, 0.55, 0.9, f64::NAN],
            0.0,
            1.0,
            10,
            "Dice",
        ));
        p.raw(&lines_svg(
            &[("val mDice", vec![(1.0, 0.5), (2.0, 0.7)])],
            "epoch",
            "mDice",
        ));
        let t = Table {
            id: "scores".into(),
            headers: vec!["id".into(), "Dice".into()],
            rows: vec![vec![Cell::Text("<a>".into()), Cell::Num(0.25, 4)]],
        };
        p.raw(&t.html());
        let h = p.finish();
        assert!(h.contains("<title>mDice &lt;report&gt; &amp; &quot;more&quot;</title>"));
        assert!(h.contains(">Dice</text>") && h.contains(">val mDice</text>"));
        assert!(h.contains("<td>&lt;a&gt;</td>") && h.contains("data-v=\"0.25\">0.2500"));
        assert!(!h.contains("http"), "the page must need no network");
    }

    #[test]
    fn epoch_axes_tick_whole_numbers_and_learning_rates_read_in_scientific_notation() {
        let fmt = AxisFormat {
            x_integer: true,
            y_scientific: true,
        };
        let svg = lines_svg_with(
            &[("lr", vec![(1.0, 1e-3), (2.0, 6e-4), (3.0, 1e-4)])],
            "epoch",
            "learning rate",
            fmt,
        );
        for t in [
            ">1</text>",
            ">2</text>",
            ">3</text>",
            ">1.0e-3</text>",
            ">1.0e-4</text>",
        ] {
            assert!(svg.contains(t), "{t} in {svg}");
        }
        assert!(
            !svg.contains(">1.50</text>") && !svg.contains(">0.001</text>"),
            "{svg}"
        );
        assert_eq!(ticks(1.0, 20.0, true), vec![1.0, 6.0, 11.0, 16.0]);
        assert_eq!(ticks(1.0, 2.0, true), vec![1.0, 2.0]);
        // A constant learning rate still spans a readable band.
        let flat = lines_svg_with(
            &[("lr", vec![(1.0, 2e-4), (2.0, 2e-4)])],
            "epoch",
            "lr",
            fmt,
        );
        assert!(flat.contains(">2.0e-4</text>"), "{flat}");
    }
}
