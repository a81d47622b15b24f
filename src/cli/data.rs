//! `gps-seg data <what>`: generate synthetic datasets and check a dataset folder.

use clap::Subcommand;
use gps_seg::data::{
    synth_cls, synth_kvasir, synth_pranet, ClsDataset, ClsLayout, ClsSplit, KvasirDataset,
    PranetDataset,
};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// Write a synthetic Kvasir-SEG (images/, masks/, kavsir_bboxes.json).
    SynthKvasir {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest image side (Kvasir goes up to 1920).
        #[arg(long, default_value_t = 720)]
        max_side: usize,
        /// Also write OUT/preview.png, a contact sheet of a few image/mask pairs.
        #[arg(long)]
        preview: bool,
    },
    /// Write a synthetic set in PraNet's layout: TrainDataset/{image,mask} and the five
    /// TestDataset/<Set>/{images,masks}, each test set with its own seed and look.
    SynthPranet {
        #[arg(long)]
        out: PathBuf,
        /// Images in TrainDataset (at least 2).
        #[arg(long, default_value_t = 80)]
        train: usize,
        /// Images in each test set.
        #[arg(long, default_value_t = 16)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image width (Kvasir-like sizes are drawn up to it).
        #[arg(long, default_value_t = 352)]
        max_side: usize,
    },
    /// Write a synthetic classification set.
    SynthCls {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Train+val images per class (80/20); the test set has the same size.
        #[arg(long, default_value_t = 100)]
        per_class: usize,
        /// vtab or imagefolder.
        #[arg(long, default_value = "vtab")]
        layout: String,
        /// upstream (shape × colour classes, for pretraining) or downstream (texture × shape).
        #[arg(long, default_value = "downstream")]
        kind: String,
        /// Image side in pixels.
        #[arg(long, default_value_t = 32)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Open a dataset, report its size and every problem found.
    Check {
        /// kvasir, pranet, imagefolder, vtab, fgvc, cifar100 or auto.
        #[arg(long, default_value = "kvasir")]
        layout: String,
        #[arg(long, default_value = "train")]
        split: String,
        /// Fully decode every image (Kvasir, PraNet; slower, finds corrupt files).
        #[arg(long)]
        decode: bool,
        /// Kvasir, PraNet: report the pairs with problems and count the clean ones, instead of failing
        /// (`train --skip-bad` trains on those clean pairs).
        #[arg(long)]
        skip_bad: bool,
        /// Largest image accepted, in pixels (width × height), checked from the header.
        #[arg(long, default_value_t = gps_seg::data::imgio::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
        root: PathBuf,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::SynthKvasir {
            out,
            count,
            seed,
            max_side,
            preview,
        } => synth_kvasir_set(&out, count, seed, max_side, preview),
        What::SynthPranet {
            out,
            train,
            test,
            seed,
            max_side,
        } => synth_pranet_set(
            &out,
            &synth_pranet::SynthPranetConfig {
                train,
                test,
                seed,
                max_side,
            },
        ),
        What::SynthCls {
            out,
            classes,
            per_class,
            layout,
            kind,
            size,
            seed,
        } => {
            let cfg = synth_cls::SynthClsConfig {
                classes,
                per_class,
                test_per_class: per_class,
                layout: layout.parse()?,
                kind: kind.parse()?,
                size,
                seed,
            };
            let n = synth_cls::generate(&out, &cfg)?;
            println!(
                "wrote {n} images ({classes} {kind} classes, {layout}) to {}",
                out.display()
            );
            Ok(())
        }
        What::Check {
            layout,
            split,
            decode,
            skip_bad,
            max_pixels,
            root,
        } => {
            gps_seg::data::imgio::set_max_pixels(max_pixels)?;
            let open_opts = gps_seg::data::kvasir::OpenOptions {
                verify_decode: decode,
                skip_bad,
            };
            match layout.as_str() {
                "pranet" => check_pranet(&root, &open_opts),
                "kvasir" => check_kvasir(&root, &open_opts),
                _ => check_classification(&root, &layout, &split),
            }
        }
    }
}

fn synth_kvasir_set(
    out: &Path,
    count: usize,
    seed: u64,
    max_side: usize,
    preview: bool,
) -> anyhow::Result<()> {
    let cfg = synth_kvasir::SynthKvasirConfig {
        count,
        seed,
        max_side,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let s = synth_kvasir::generate(out, &cfg)?;
    println!(
        "wrote {} images ({} polyps, sizes {}×{} … {}×{} h×w, mean polyp area {:.1}%) to {} in {:.1}s",
        s.count,
        s.polyps,
        s.min_size.0,
        s.min_size.1,
        s.max_size.0,
        s.max_size.1,
        100.0 * s.mean_polyp_fraction,
        out.display(),
        t.elapsed().as_secs_f64()
    );
    if preview {
        let p = out.join("preview.png");
        synth_kvasir::write_preview(&p, seed, count.min(6), max_side)?;
        println!("preview: {}", p.display());
    }
    Ok(())
}

fn synth_pranet_set(out: &Path, cfg: &synth_pranet::SynthPranetConfig) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let sets = synth_pranet::generate(out, cfg)?;
    for s in &sets {
        println!(
            "{:18} {:4} images, sizes {}×{} … {}×{} (h×w), mean polyp area {:.1}%",
            s.name,
            s.count,
            s.min_size.0,
            s.min_size.1,
            s.max_size.0,
            s.max_size.1,
            100.0 * s.mean_polyp_fraction
        );
    }
    println!(
        "wrote a PraNet-layout set to {} in {:.1}s",
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn check_pranet(root: &Path, opts: &gps_seg::data::kvasir::OpenOptions) -> anyhow::Result<()> {
    let ds = PranetDataset::open_with(root, opts)?;
    for l in &ds.skipped {
        println!("skipped: {l}");
    }
    println!("{} (PraNet layout):", root.display());
    for l in ds.report() {
        println!("  {l}");
    }
    if ds.train.is_none() {
        println!("  no TrainDataset/ (evaluation only)");
    }
    Ok(())
}

fn check_kvasir(root: &Path, opts: &gps_seg::data::kvasir::OpenOptions) -> anyhow::Result<()> {
    let ds = KvasirDataset::open_with(root, opts)?;
    for l in &ds.skipped {
        println!("skipped: {l}");
    }
    let (mut lo, mut hi) = ((usize::MAX, usize::MAX), (0, 0));
    for e in &ds.entries {
        lo = (lo.0.min(e.size.0), lo.1.min(e.size.1));
        hi = (hi.0.max(e.size.0), hi.1.max(e.size.1));
    }
    let boxes: usize = ds.entries.iter().map(|e| e.boxes.len()).sum();
    println!(
        "{}: {} image/mask pairs, sizes {}×{} … {}×{} (h×w), {boxes} boxes",
        root.display(),
        ds.len(),
        lo.0,
        lo.1,
        hi.0,
        hi.1
    );
    match &ds.root_split {
        Some(s) => println!(
            "split from {}: {} train / {} test",
            s.source,
            s.train.len(),
            s.test.len()
        ),
        None => println!("no split files; training will use a seeded 88/12 split"),
    }
    Ok(())
}

fn check_classification(root: &Path, layout: &str, split: &str) -> anyhow::Result<()> {
    let l = if layout == "auto" {
        ClsLayout::detect(root)?
    } else {
        layout.parse()?
    };
    let sp: ClsSplit = split.parse()?;
    let ds = ClsDataset::open(root, l, sp, None)?;
    println!("{} ({l:?}, {sp:?}): {}", root.display(), ds.report());
    Ok(())
}
