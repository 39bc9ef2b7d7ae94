//! `pmigrate-plot`: SVG plots of the CSV that `pmigrate bench --sweep` prints.
//!
//! ```sh
//! pmigrate bench --sweep ... > sweep.csv
//! cargo run --release -p pmigrate-bench --bin pmigrate-plot -- sweep.csv docs/plots
//! ```
//!
//! writes into the output directory:
//!
//! - `throughput.svg`: transfer rate against threads = streams, one line per
//!   link count, idle guest, each with the raw TCP ceiling measured in the
//!   same sweep (dashed);
//! - `links.svg`: transfer rate against the link count, at the best
//!   threads = streams of each, beside the raw TCP ceiling, idle guest;
//! - `downtime.svg`: downtime against the dirty rate, one line per link count
//!   at its largest threads = streams, runs that did not converge marked.
//!
//! Combinations missing from the CSV are left out. Only the columns the plots
//! need are read, by name; a malformed file is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, ensure, Context, Result};
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const USAGE: &str = "usage: pmigrate-plot <CSV> <OUTDIR>

Plots the CSV of `pmigrate bench --sweep` into OUTDIR/throughput.svg,
OUTDIR/links.svg and OUTDIR/downtime.svg.";

/// Size of every plot, pixels.
const SIZE: (u32, u32) = (800, 500);
const FONT: &str = "sans-serif";
/// One colour per link count (Okabe-Ito: tells apart with colour blindness).
const COLORS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];
const GREY: RGBColor = RGBColor(90, 90, 90);

/// The columns read, by name.
const COLUMNS: [&str; 9] = [
    "threads",
    "streams",
    "links",
    "dirty_mib_s",
    "compression",
    "transfer_mib_s",
    "raw_tcp_mib_s",
    "downtime_ms",
    "converged",
];

/// One run of the sweep (the mean of its rows if the CSV repeats it).
#[derive(Clone, Debug)]
struct Run {
    threads: u32,
    streams: u32,
    links: u32,
    dirty: f64,
    transfer: f64,
    raw: f64,
    downtime: f64,
    converged: bool,
}

struct Sweep {
    compression: String,
    /// Sorted by links, threads, dirty rate.
    runs: Vec<Run>,
    /// Every link count of the sweep: the colour of a link count is its
    /// place here, the same in every plot.
    links: Vec<u32>,
}

impl Sweep {
    fn color(&self, links: u32) -> RGBColor {
        COLORS[self.links.iter().position(|&l| l == links).unwrap_or(0) % COLORS.len()]
    }

    fn idle(&self) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(|r| r.dirty == 0.0)
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let [csv, out] = &args[..] else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match run(Path::new(csv), Path::new(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmigrate-plot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Draws one plot into the file; false if the sweep has no data for it.
type Plot = fn(&Sweep, &Path) -> Result<bool>;

fn run(csv: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let sweep = parse(&text).with_context(|| format!("{}: not the CSV of `pmigrate bench --sweep`", csv.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let plots: [(&str, Plot); 3] = [("throughput.svg", throughput), ("links.svg", links), ("downtime.svg", downtime)];
    let mut written = 0;
    for (name, plot) in plots {
        let path = out.join(name);
        if plot(&sweep, &path).with_context(|| format!("writing {}", path.display()))? {
            println!("{}", path.display());
            written += 1;
        } else {
            eprintln!("pmigrate-plot: no data for {name}, skipped");
        }
    }
    ensure!(written > 0, "nothing to plot");
    Ok(())
}

/// Reads the CSV: a header naming at least [`COLUMNS`], then one row per run.
/// Blank lines and repeated headers (concatenated sweeps) are skipped.
fn parse(text: &str) -> Result<Sweep> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty());
    let Some((hn, header)) = lines.next() else { bail!("the file is empty") };
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let mut col = [0; COLUMNS.len()];
    for (c, want) in col.iter_mut().zip(COLUMNS) {
        *c = names
            .iter()
            .position(|n| *n == want)
            .with_context(|| format!("line {hn}: the header has no column {want:?} (it has {})", names.join(",")))?;
    }
    let [threads, streams, links, dirty, compression, transfer, raw, downtime, converged] = col;

    let mut compressions = BTreeSet::new();
    let mut rows: BTreeMap<(u32, u32, u64), Vec<Run>> = BTreeMap::new();
    for (n, line) in lines {
        if line == header {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        ensure!(f.len() == names.len(), "line {n}: {} fields, the header has {}: {line:?}", f.len(), names.len());
        let count = |c: usize| -> Result<u32> {
            let v: u32 =
                f[c].parse().ok().filter(|&v| v > 0).with_context(|| {
                    format!("line {n}, column {}: {:?} is not a positive whole number", names[c], f[c])
                })?;
            Ok(v)
        };
        let number = |c: usize| -> Result<f64> {
            let v: f64 =
                f[c].parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0).with_context(|| {
                    format!("line {n}, column {}: {:?} is not a non-negative number", names[c], f[c])
                })?;
            Ok(v + 0.0) // no -0
        };
        let run = Run {
            threads: count(threads)?,
            streams: count(streams)?,
            links: count(links)?,
            dirty: number(dirty)?,
            transfer: number(transfer)?,
            raw: number(raw)?,
            downtime: number(downtime)?,
            converged: match f[converged] {
                "true" | "1" => true,
                "false" | "0" => false,
                other => bail!("line {n}, column converged: {other:?} is neither true nor false"),
            },
        };
        compressions.insert(f[compression].to_string());
        // Non-negative floats sort as their bits do.
        rows.entry((run.links, run.threads, run.dirty.to_bits())).or_default().push(run);
    }
    ensure!(!rows.is_empty(), "no rows after the header");
    ensure!(
        compressions.len() == 1,
        "the rows mix compression modes ({}): plot one sweep at a time",
        compressions.into_iter().collect::<Vec<_>>().join(", ")
    );
    let runs: Vec<Run> = rows.into_values().map(mean).collect();
    let links = runs.iter().map(|r| r.links).collect::<BTreeSet<_>>().into_iter().collect();
    Ok(Sweep { compression: compressions.pop_first().unwrap_or_default(), runs, links })
}

/// One run from the rows of a repeated run: the mean figures, converged only
/// if all converged.
fn mean(rows: Vec<Run>) -> Run {
    let n = rows.len() as f64;
    let mut m = rows[0].clone();
    if rows.len() > 1 {
        eprintln!(
            "pmigrate-plot: {} rows of {}, {}, {} MiB/s dirty: plotting their mean",
            rows.len(),
            plural(m.threads, "thread"),
            plural(m.links, "link"),
            m.dirty
        );
        m.transfer = rows.iter().map(|r| r.transfer).sum::<f64>() / n;
        m.raw = rows.iter().map(|r| r.raw).sum::<f64>() / n;
        m.downtime = rows.iter().map(|r| r.downtime).sum::<f64>() / n;
        m.converged = rows.iter().all(|r| r.converged);
    }
    m
}

fn plural(n: u32, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// A legend entry's symbol.
enum Mark {
    /// A measured series: solid line, filled dot.
    Line(RGBColor),
    /// A ceiling: dashed line, hollow dot.
    Dashed(RGBColor),
    /// A run that did not converge.
    Cross(RGBColor),
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The white canvas with a title and a subtitle, split into the plotting
/// area and a legend column on the right wide enough for `legend`.
fn canvas<'a>(root: &Area<'a>, title: &str, subtitle: &str, legend: &[(String, Mark)]) -> Result<(Area<'a>, Area<'a>)> {
    root.fill(&WHITE)?;
    let body = root.titled(title, (FONT, 22).into_font().style(FontStyle::Bold))?;
    let body = body.titled(subtitle, (FONT, 14).into_font().color(&GREY))?;
    // About 7.5 px a character at 14 px, plus the symbol.
    let widest = legend.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0) as u32;
    let width = (60 + widest * 15 / 2).clamp(120, SIZE.0 / 3);
    let (plot, side) = body.split_horizontally(SIZE.0 - width);
    draw_legend(&side, legend)?;
    Ok((plot, side))
}

fn draw_legend(area: &Area, entries: &[(String, Mark)]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let text = (FONT, 14).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let (x0, x1, step) = (8, 40, 24);
    let top = 20;
    let bottom = top + step * entries.len() as i32 - step / 2;
    let right = area.dim_in_pixel().0 as i32 - 6;
    area.draw(&Rectangle::new([(2, top - step / 2 - 2), (right, bottom + 2)], GREY.mix(0.6).stroke_width(1)))?;
    for (i, (label, mark)) in entries.iter().enumerate() {
        let y = top + step * i as i32;
        let mid = ((x0 + x1) / 2, y);
        match mark {
            Mark::Line(c) => {
                area.draw(&PathElement::new(vec![(x0, y), (x1, y)], c.stroke_width(2)))?;
                area.draw(&Circle::new(mid, 4, c.filled()))?;
            }
            Mark::Dashed(c) => {
                area.draw(&DashedPathElement::new(vec![(x0, y), (x1, y)], 7, 4, c.stroke_width(2)))?;
                area.draw(&Circle::new(mid, 4, WHITE.filled()))?;
                area.draw(&Circle::new(mid, 4, c.stroke_width(2)))?;
            }
            Mark::Cross(c) => area.draw(&Cross::new(mid, 6, c.stroke_width(3)))?,
        }
        area.draw(&Text::new(label.clone(), (x1 + 8, y), text.clone()))?;
    }
    Ok(())
}

/// A log2-like axis over `values` (all > 0) with a tick at each of them.
fn log_axis(values: &BTreeSet<u32>) -> WithKeyPoints<LogCoord<f64>> {
    let lo = values.first().copied().unwrap_or(1).max(1) as f64;
    let hi = values.last().copied().unwrap_or(1).max(1) as f64;
    ((lo / 1.25)..(hi * 1.25)).log_scale().with_key_points(values.iter().map(|&v| v as f64).collect())
}

/// `0 ..` a little above `max`, never empty.
fn y_range(max: f64, headroom: f64) -> std::ops::Range<f64> {
    0.0..if max > 0.0 { max * headroom } else { 1.0 }
}

/// A tick label with as many decimals as a span this wide needs.
fn tick(v: f64, span: f64) -> String {
    match span {
        s if s >= 20.0 => format!("{v:.0}"),
        s if s >= 2.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

fn count_label(v: &f64) -> String {
    format!("{}", v.round())
}

/// 1. Transfer rate against threads = streams, a line per link count, with
///    the raw TCP ceiling of each; idle guest.
fn throughput(s: &Sweep, path: &Path) -> Result<bool> {
    let idle: Vec<&Run> = s.idle().collect();
    if idle.is_empty() {
        return Ok(false);
    }
    let links: BTreeSet<u32> = idle.iter().map(|r| r.links).collect();
    let threads: BTreeSet<u32> = idle.iter().map(|r| r.threads).collect();
    let ymax = idle.iter().map(|r| r.transfer.max(r.raw)).fold(0.0, f64::max);
    let name =
        |what: &str, l: u32| if links.len() == 1 { what.to_string() } else { format!("{what}, {}", plural(l, "link")) };
    let mut legend = vec![];
    for &l in &links {
        legend.push((name("pmigrate", l), Mark::Line(s.color(l))));
        legend.push((name("raw TCP", l), Mark::Dashed(s.color(l))));
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let one_link = if links.len() == 1 {
        format!("{}; ", plural(links.first().copied().unwrap_or(1), "link"))
    } else {
        String::new()
    };
    let (plot, _) = canvas(
        &root,
        "Transfer rate by threads and streams",
        &format!(
            "idle guest; {one_link}compression {}; dashed: raw TCP over the same path, as many streams",
            s.compression
        ),
        &legend,
    )?;
    let yr = y_range(ymax, 1.1);
    let span = yr.end;
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(log_axis(&threads), yr)?;
    chart
        .configure_mesh()
        .x_desc("threads = streams (streams raised to the link count if fewer)")
        .y_desc("transfer rate (MiB/s)")
        .x_label_formatter(&count_label)
        .y_label_formatter(&|v| tick(*v, span))
        .y_labels(8)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for &l in &links {
        let c = s.color(l);
        let runs: Vec<&Run> = idle.iter().copied().filter(|r| r.links == l).collect();
        let raw: Vec<(f64, f64)> = runs.iter().map(|r| (r.threads as f64, r.raw)).collect();
        chart.draw_series(DashedLineSeries::new(raw.clone(), 7, 4, c.stroke_width(2)))?;
        chart.draw_series(raw.iter().map(|&p| Circle::new(p, 4, WHITE.filled())))?;
        chart.draw_series(raw.iter().map(|&p| Circle::new(p, 4, c.stroke_width(2))))?;
        let ours: Vec<(f64, f64)> = runs.iter().map(|r| (r.threads as f64, r.transfer)).collect();
        chart.draw_series(LineSeries::new(ours.clone(), c.stroke_width(2)))?;
        chart.draw_series(ours.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    root.present()?;
    Ok(true)
}

/// 2. Transfer rate against the link count, at the best threads = streams
///    of each, with the raw TCP ceiling; idle guest.
fn links(s: &Sweep, path: &Path) -> Result<bool> {
    // Per link count: the fastest idle run, and the best raw TCP figure.
    let mut best: BTreeMap<u32, (&Run, f64)> = BTreeMap::new();
    for r in s.idle() {
        let e = best.entry(r.links).or_insert((r, r.raw));
        if r.transfer > e.0.transfer {
            e.0 = r;
        }
        e.1 = e.1.max(r.raw);
    }
    if best.is_empty() {
        return Ok(false);
    }
    let links: BTreeSet<u32> = best.keys().copied().collect();
    let ymax = best.values().map(|(r, raw)| r.transfer.max(*raw)).fold(0.0, f64::max);
    let (ours, ceiling) = (COLORS[0], GREY);
    let legend = vec![
        ("pmigrate, fastest run".to_string(), Mark::Line(ours)),
        ("raw TCP, fastest run".to_string(), Mark::Dashed(ceiling)),
    ];
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let (plot, _) = canvas(
        &root,
        "Transfer rate by link count",
        &format!("idle guest; compression {}; labels: fastest threads x streams (share of raw TCP)", s.compression),
        &legend,
    )?;
    let yr = y_range(ymax, 1.18);
    let span = yr.end;
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(log_axis(&links), yr)?;
    chart
        .configure_mesh()
        .x_desc("links")
        .y_desc("transfer rate (MiB/s)")
        .x_label_formatter(&count_label)
        .y_label_formatter(&|v| tick(*v, span))
        .y_labels(8)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let raw: Vec<(f64, f64)> = best.iter().map(|(&l, (_, raw))| (l as f64, *raw)).collect();
    chart.draw_series(DashedLineSeries::new(raw.clone(), 7, 4, ceiling.stroke_width(2)))?;
    chart.draw_series(raw.iter().map(|&p| Circle::new(p, 4, WHITE.filled())))?;
    chart.draw_series(raw.iter().map(|&p| Circle::new(p, 4, ceiling.stroke_width(2))))?;
    let pts: Vec<(f64, f64)> = best.iter().map(|(&l, (r, _))| (l as f64, r.transfer)).collect();
    chart.draw_series(LineSeries::new(pts.clone(), ours.stroke_width(2)))?;
    // The label on the side away from the ceiling, on a white patch so
    // that lines crossing it do not hide it.
    chart.draw_series(best.iter().map(|(&l, (r, raw))| {
        let share = if *raw > 0.0 { format!(" ({:.0}%)", 100.0 * r.transfer / raw) } else { String::new() };
        let text = format!("{}x{}{share}", r.threads, r.streams);
        let (w, h) = (text.chars().count() as i32 * 7 / 2 + 3, 16);
        let (y, v) = if *raw >= r.transfer { (10, VPos::Top) } else { (-10, VPos::Bottom) };
        let patch = if y > 0 { [(-w, y - 1), (w, y + h)] } else { [(-w, y - h), (w, y + 1)] };
        let font = (FONT, 13).into_font().color(&BLACK).pos(Pos::new(HPos::Center, v));
        EmptyElement::at((l as f64, r.transfer))
            + Rectangle::new(patch, WHITE.mix(0.85).filled())
            + Circle::new((0, 0), 4, ours.filled())
            + Text::new(text, (0, y), font)
    }))?;
    root.present()?;
    Ok(true)
}

/// 3. Downtime against the dirty rate, a line per link count at its largest
///    threads = streams; runs that did not converge marked.
fn downtime(s: &Sweep, path: &Path) -> Result<bool> {
    let mut lines: Vec<(u32, Vec<&Run>)> = vec![];
    for &l in &s.links {
        let Some(t) = s.runs.iter().filter(|r| r.links == l).map(|r| r.threads).max() else { continue };
        lines.push((l, s.runs.iter().filter(|r| r.links == l && r.threads == t).collect()));
    }
    let all: Vec<&Run> = lines.iter().flat_map(|(_, rs)| rs.iter().copied()).collect();
    if all.is_empty() {
        return Ok(false);
    }
    let xmax = all.iter().map(|r| r.dirty).fold(0.0, f64::max);
    let xr = if xmax > 0.0 { -0.05 * xmax..1.08 * xmax } else { -0.5..0.5 };
    let ymax = all.iter().map(|r| r.downtime).fold(0.0, f64::max);
    let failed = all.iter().any(|r| !r.converged);
    let mut legend: Vec<(String, Mark)> = lines
        .iter()
        .map(|(l, rs)| {
            let (t, st) = (rs[0].threads, rs.iter().map(|r| r.streams).max().unwrap_or(0));
            (format!("{}, {t}x{st}", plural(*l, "link")), Mark::Line(s.color(*l)))
        })
        .collect();
    if failed {
        legend.push(("did not converge".to_string(), Mark::Cross(BLACK)));
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let (plot, _) = canvas(
        &root,
        "Downtime by dirty rate",
        &format!("largest threads x streams of each link count; compression {}", s.compression),
        &legend,
    )?;
    let yr = y_range(ymax, 1.12);
    let span = yr.end;
    let xspan = xr.end - xr.start;
    let mut chart =
        ChartBuilder::on(&plot).margin(12).x_label_area_size(48).y_label_area_size(72).build_cartesian_2d(xr, yr)?;
    chart
        .configure_mesh()
        .x_desc("guest dirty rate (MiB/s)")
        .y_desc("downtime (ms)")
        .x_label_formatter(&|v| tick(*v, xspan))
        .x_labels(8)
        .y_label_formatter(&|v| tick(*v, span))
        .y_labels(8)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (l, rs) in &lines {
        let c = s.color(*l);
        let pts: Vec<(f64, f64)> = rs.iter().map(|r| (r.dirty, r.downtime)).collect();
        chart.draw_series(LineSeries::new(pts, c.stroke_width(2)))?;
        chart.draw_series(
            rs.iter().filter(|r| r.converged).map(|r| Circle::new((r.dirty, r.downtime), 4, c.filled())),
        )?;
        chart.draw_series(
            rs.iter().filter(|r| !r.converged).map(|r| Cross::new((r.dirty, r.downtime), 7, c.stroke_width(3))),
        )?;
    }
    root.present()?;
    Ok(true)
}
