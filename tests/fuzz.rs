//! Fuzz-style robustness test: seeded, bounded mutations of the header and body of
//!
//! - (a) a small SAM safetensors file, fed to `tensors::load`, `sam::info` (the `info`
//!   command's path), `registry::resolve`, `load_weights` + `build` and a forward pass;
//! - (b) a PNG, a JPEG and a TIFF (CVC-ClinicDB's original format), fed to
//!   `imgio::dimensions` / `decode_rgb` / `decode_luma`;
//! - (c) an ONNX file exported by the project, fed to ONNX Runtime through `OrtModel::load`,
//!   the inference engine's signature checks and one run (skipped, with the reason printed,
//!   when the ONNX Runtime library cannot be found);
//! - (e) a shard's `report.json` (structural edits of its JSON: values replaced by
//!   interesting numbers and types, keys removed, elements repeated; and raw bytes), fed to
//!   `report merge` with an intact second shard, in both orders;
//! - (f) prompt files, JSON and CSV (the same JSON edits; CSV fields replaced, added or
//!   removed, quotes and byte-order marks; raw bytes), read, checked against two images and
//!   mapped into the input frame.
//!
//! Every case runs under `catch_unwind`; a panic hook records where each panic happened.
//! Cases whose panic is in the SAM / tensor-loading code (the safetensors part, or any
//! frame in `gps_seg::sam`, `gps_seg::nn`, `gps_seg::models`, `gps_seg::util::tensors`)
//! fail the test, listing the first seeds. Panics under `gps_seg::data::imgio` or
//! `gps_seg::infer` (decoding and ONNX Runtime loading, owned elsewhere) are printed as
//! known findings with their recipe and do not fail it. An abort (e.g. an unbounded
//! allocation) kills the test binary, which fails the test too. Sizes declared by
//! structure-aware mutations stay within the bounds the loaders check.

mod common;

use candle_core::{DType, Device, Tensor};
use common::crc32;
use gps_seg::nn::{ParamStore, RolePolicy};
use gps_seg::sam::{self, SamConfig};
use gps_seg::util::tensors::{self, TensorMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// xorshift64*: the fuzzer's own small generator (independent of the crate's).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Panics recorded by the hook: (location, first `gps_seg::` frame, message).
static PANICS: Mutex<Vec<(String, String, String)>> = Mutex::new(Vec::new());
/// One fuzz part at a time: the hook's records belong to the running case.
static SERIAL: Mutex<()> = Mutex::new(());

/// True while a fuzz case runs: its panics are recorded, not printed.
static IN_CASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static HOOK: std::sync::Once = std::sync::Once::new();

fn install_hook() {
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_CASE.load(std::sync::atomic::Ordering::SeqCst) {
                return default(info);
            }
            let loc = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let bt = std::backtrace::Backtrace::force_capture().to_string();
            let frame = bt
                .lines()
                .map(str::trim)
                .find(|l| l.contains("gps_seg::") && !l.contains("fuzz::"))
                .unwrap_or("")
                .to_string();
            if let Ok(mut p) = PANICS.lock() {
                p.push((loc, frame, msg));
            }
        }));
    });
}

/// Where a panic is: in code this test holds to "never panics" (true), or elsewhere.
fn in_checked_area(loc: &str, frame: &str) -> bool {
    const MINE: [&str; 5] = [
        "gps_seg::sam::",
        "gps_seg::nn::",
        "gps_seg::models::",
        "gps_seg::util::tensors",
        "gps_seg::util::mem",
    ];
    const FILES: [&str; 5] = [
        "src/sam/",
        "src/nn/layers.rs",
        "src/models/",
        "src/util/tensors.rs",
        "src/util/mem.rs",
    ];
    MINE.iter().any(|m| frame.contains(m)) || FILES.iter().any(|f| loc.contains(f))
}

#[derive(Default)]
struct Tally {
    ok: usize,
    errors: usize,
    /// (seed, recipe, location, frame, message) of panics that fail the test.
    failing: Vec<(u64, String, String, String, String)>,
    /// The same for panics in code owned elsewhere (reported only).
    known: Vec<(u64, String, String, String, String)>,
}

impl Tally {
    /// Run one case; `always_mine`: every panic of this part fails the test.
    fn run(
        &mut self,
        seed: u64,
        recipe: &str,
        always_mine: bool,
        f: impl FnOnce() -> Result<(), String>,
    ) {
        if let Ok(mut p) = PANICS.lock() {
            p.clear();
        }
        IN_CASE.store(true, std::sync::atomic::Ordering::SeqCst);
        let outcome = catch_unwind(AssertUnwindSafe(f));
        IN_CASE.store(false, std::sync::atomic::Ordering::SeqCst);
        match outcome {
            Ok(Ok(())) => self.ok += 1,
            Ok(Err(e)) => {
                assert!(!e.is_empty(), "seed {seed}: empty error message");
                self.errors += 1
            }
            Err(_) => {
                let (loc, frame, msg) = PANICS
                    .lock()
                    .ok()
                    .and_then(|p| p.first().cloned())
                    .unwrap_or_default();
                let row = (seed, recipe.to_string(), loc, frame, msg);
                if always_mine || in_checked_area(&row.2, &row.3) {
                    self.failing.push(row);
                } else {
                    self.known.push(row);
                }
            }
        }
    }

    fn finish(self, part: &str, started: Instant) {
        let cases = self.ok + self.errors + self.failing.len() + self.known.len();
        eprintln!(
            "{part}: {cases} cases in {:.2}s: {} accepted, {} refused with an error, {} panics \
             in checked code, {} panics elsewhere",
            started.elapsed().as_secs_f64(),
            self.ok,
            self.errors,
            self.failing.len(),
            self.known.len()
        );
        for (seed, recipe, loc, frame, msg) in self.known.iter().take(10) {
            eprintln!(
                "  known (not in checked code) seed {seed}: {recipe}\n    at {loc} [{frame}]: {msg}"
            );
        }
        let list: Vec<String> = self
            .failing
            .iter()
            .take(10)
            .map(|(seed, recipe, loc, frame, msg)| {
                format!("seed {seed}: {recipe}\n    at {loc} [{frame}]: {msg}")
            })
            .collect();
        assert!(
            self.failing.is_empty(),
            "{part}: {} panics in checked code; first:\n{}",
            self.failing.len(),
            list.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Byte-level mutations.

const INTERESTING_U8: [u8; 6] = [0, 1, 0x7F, 0x80, 0xFE, 0xFF];
const INTERESTING_U32: [u32; 7] = [0, 1, 2, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1000];

/// One random edit inside `data[lo..hi]` (clamped); returns its description.
fn mutate_region(rng: &mut XorShift, data: &mut Vec<u8>, lo: usize, hi: usize) -> String {
    let hi = hi.min(data.len());
    if lo >= hi {
        data.push(rng.next() as u8);
        return "append a byte".into();
    }
    let at = lo + rng.below(hi - lo);
    match rng.below(7) {
        0 => {
            let bit = rng.below(8);
            data[at] ^= 1 << bit;
            format!("flip bit {bit} of byte {at}")
        }
        1 => {
            let v = *rng.pick(&INTERESTING_U8);
            data[at] = v;
            format!("byte {at} = {v:#x}")
        }
        2 => {
            let v = *rng.pick(&INTERESTING_U32);
            for (k, b) in v.to_le_bytes().iter().enumerate() {
                if at + k < data.len() {
                    data[at + k] = *b;
                }
            }
            format!("u32 at {at} = {v:#x}")
        }
        3 => {
            let n = 1 + rng.below(64);
            let end = (at + n).min(data.len());
            data[at..end].fill(0);
            format!("zero {} bytes at {at}", end - at)
        }
        4 => {
            let n = 1 + rng.below(32);
            let end = (at + n).min(data.len());
            data.drain(at..end);
            format!("delete {} bytes at {at}", end - at)
        }
        5 => {
            let n = 1 + rng.below(32);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(at..at, bytes);
            format!("insert {n} random bytes at {at}")
        }
        _ => {
            let keep = at.max(1);
            data.truncate(keep);
            format!("truncate to {keep} bytes")
        }
    }
}

// ---------------------------------------------------------------------------------------
// (a) safetensors.

/// A SAM small enough that every case loads, builds and runs in milliseconds: 64 px input,
/// grid 4, two blocks (one windowed with window 2, one global), widths 16.
fn micro_sam() -> SamConfig {
    let mut c = SamConfig::tiny();
    c.name = "micro".into();
    c.image_size = 64;
    c.patch_size = 16;
    c.encoder_embed_dim = 16;
    c.encoder_depth = 2;
    c.encoder_num_heads = 2;
    c.encoder_global_attn_indexes = vec![1];
    c.window_size = 2;
    c.prompt_embed_dim = 16;
    c.mask_in_chans = 4;
    c.decoder_depth = 1;
    c.decoder_mlp_dim = 16;
    c.decoder_num_heads = 2;
    c.iou_head_hidden_dim = 8;
    c
}

fn micro_weights() -> TensorMap {
    let vs = ParamStore::init(&Device::Cpu, 3);
    sam::Sam::new(&micro_sam(), &vs).unwrap();
    vs.current_tensors().unwrap()
}

/// A shape of rank 0–4 with at most 4096 entries, often containing a 0 or a 1.
fn random_shape(rng: &mut XorShift) -> Vec<usize> {
    const DIMS: [usize; 9] = [0, 1, 2, 3, 4, 7, 8, 15, 16];
    loop {
        let rank = rng.below(5);
        let s: Vec<usize> = (0..rank).map(|_| *rng.pick(&DIMS)).collect();
        if s.iter().product::<usize>() <= 4096 {
            return s;
        }
    }
}

/// Tensors `sam::info` reads the config from, and the position tables load resizes.
const KEY_TENSORS: [&str; 10] = [
    "image_encoder.patch_embed.proj.weight",
    "image_encoder.pos_embed",
    "image_encoder.blocks.0.attn.rel_pos_h",
    "image_encoder.blocks.1.attn.rel_pos_w",
    "image_encoder.blocks.0.mlp.lin1.weight",
    "image_encoder.neck.0.weight",
    "prompt_encoder.mask_downscaling.3.weight",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    "mask_decoder.mask_tokens.weight",
    "mask_decoder.iou_prediction_head.layers.0.weight",
];

const JSON_NUMBERS: [&str; 10] = [
    "0",
    "1",
    "2",
    "3",
    "7",
    "16",
    "65535",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999",
];

/// One mutation of a safetensors file: at the tensor level (shape, removal, renaming,
/// extra block, dtype), of the JSON header (numbers, dtype names, length prefix) or of the
/// raw bytes.
fn mutate_safetensors(
    rng: &mut XorShift,
    keys: &[&str],
    base: &TensorMap,
    base_bytes: &[u8],
) -> (Vec<u8>, String) {
    let names: Vec<&String> = base.keys().collect();
    let kind = rng.below(10);
    if kind < 4 {
        let mut m = base.clone();
        // Half the time one of the tensors whose shapes define the config.
        let key = rng.pick(keys).to_string();
        let name = if rng.below(2) == 0 && base.contains_key(&key) {
            key
        } else {
            (*rng.pick(&names)).clone()
        };
        let recipe = match rng.below(5) {
            0 | 1 => {
                let s = random_shape(rng);
                let n: usize = s.iter().product();
                let t = Tensor::from_vec(vec![0.5f32; n], s.as_slice(), &Device::Cpu).unwrap();
                m.insert(name.clone(), t);
                format!("tensor `{name}` reshaped to {s:?}")
            }
            2 => {
                m.remove(&name);
                format!("tensor `{name}` removed")
            }
            3 => {
                let t = m.remove(&name).unwrap();
                let new = name
                    .replacen(".0.", ".9.", 1)
                    .replacen("weight", "weigth", 1);
                m.insert(new.clone(), t);
                format!("tensor `{name}` renamed `{new}`")
            }
            _ => {
                let t = m[&name].to_dtype(DType::U32).unwrap();
                m.insert(name.clone(), t);
                format!("tensor `{name}` stored as u32")
            }
        };
        return (tensors::to_safetensors_bytes(&m, None).unwrap(), recipe);
    }
    let n = u64::from_le_bytes(base_bytes[..8].try_into().unwrap()) as usize;
    let header = &base_bytes[8..8 + n];
    let body = &base_bytes[8 + n..];
    match kind {
        4 | 5 => {
            // Replace one number of the JSON header (a shape dim or a data offset) and fix
            // the length prefix so that the header still parses as far as it can.
            let text = String::from_utf8_lossy(header).into_owned();
            let runs: Vec<(usize, usize)> = {
                let b = text.as_bytes();
                let mut v = Vec::new();
                let mut i = 0;
                while i < b.len() {
                    if b[i].is_ascii_digit() {
                        let s = i;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                        v.push((s, i));
                    } else {
                        i += 1;
                    }
                }
                v
            };
            let (s, e) = *rng.pick(&runs);
            let with = *rng.pick(&JSON_NUMBERS);
            let context = &text[s.saturating_sub(30)..e];
            let new = format!("{}{with}{}", &text[..s], &text[e..]);
            let mut out = (new.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(body);
            (out, format!("header number `…{context}` → {with}"))
        }
        6 => {
            let text = String::from_utf8_lossy(header).into_owned();
            let to = *rng.pick(&["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX"]);
            let new = text.replacen("\"F32\"", &format!("\"{to}\""), 1 + rng.below(3));
            let mut out = (new.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(body);
            (out, format!("dtype F32 → {to} in the header"))
        }
        7 => {
            let mut out = base_bytes.to_vec();
            let v = *rng.pick(&[0u64, 1, 7, (n + 1) as u64, u64::MAX, 1 << 40]);
            out[..8].copy_from_slice(&v.to_le_bytes());
            (out, format!("header length prefix = {v}"))
        }
        8 => {
            let mut out = base_bytes.to_vec();
            let r = mutate_region(rng, &mut out, 8, 8 + n);
            (out, format!("header: {r}"))
        }
        _ => {
            let mut out = base_bytes.to_vec();
            let len = out.len();
            let r = mutate_region(rng, &mut out, 8 + n, len);
            (out, format!("body: {r}"))
        }
    }
}

/// Everything a user can do with one checkpoint file; errors are fine, panics are not.
fn use_checkpoint(path: &Path, base_cfg: &SamConfig) -> Result<(), String> {
    let dev = Device::Cpu;
    let e = |e: gps_seg::Error| e.to_string();
    let map = tensors::load(path, &dev).map_err(e)?;
    let inferred = sam::info::infer_config(&map).map(|(c, _)| c);
    let _ = sam::info::model_info(path.to_str().unwrap_or_default());
    let _ = gps_seg::registry::resolve_sam(path.to_str().unwrap_or_default(), None);
    let mut last = Ok(());
    for cfg in [Some(base_cfg.clone()), inferred.ok()]
        .into_iter()
        .flatten()
    {
        if cfg.image_size > 128 || cfg.encoder_embed_dim > 64 {
            continue; // keep every case in milliseconds
        }
        last = (|| {
            let w = sam::load_weights(path, &cfg, &dev)?;
            let (m, _) = sam::build(&cfg, Some(w), RolePolicy::AllFrozen, &dev, 0)?;
            let s = cfg.image_size;
            let x = Tensor::zeros((1, 3, s, s), DType::F32, &dev)?;
            m.forward_prompt_free(&x)?;
            Ok::<(), gps_seg::Error>(())
        })()
        .map_err(e);
    }
    last
}

#[test]
fn fuzz_safetensors_checkpoints() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    let dir = tempfile::tempdir().unwrap();
    let cfg = micro_sam();
    let base = micro_weights();
    let bytes = tensors::to_safetensors_bytes(&base, None).unwrap();
    // The unmutated file goes all the way through.
    let good = dir.path().join("good.safetensors");
    std::fs::write(&good, &bytes).unwrap();
    use_checkpoint(&good, &cfg).unwrap();
    let started = Instant::now();
    let mut tally = Tally::default();
    for seed in 0..500u64 {
        let mut rng = XorShift::new(seed);
        let (data, recipe) = mutate_safetensors(&mut rng, &KEY_TENSORS, &base, &bytes);
        let p = dir.path().join(format!("case{seed}.safetensors"));
        std::fs::write(&p, &data).unwrap();
        tally.run(seed, &recipe, true, || use_checkpoint(&p, &cfg));
        let _ = std::fs::remove_file(&p);
    }
    assert!(
        tally.errors > 100,
        "only {} cases were refused",
        tally.errors
    );
    tally.finish("safetensors", started);
}

/// Classifiers small enough for milliseconds per case: a ViT (16 px, patch 8, width 16,
/// two blocks) and a ConvNeXt (two stages of width 8 and 16, 32 px).
fn micro_classifiers() -> Vec<gps_seg::models::ClassifierConfig> {
    use gps_seg::models::{ClassifierConfig, ConvNextConfig, VitConfig};
    let mut v = VitConfig::tiny().with_num_classes(3);
    v.image_size = 16;
    v.embed_dim = 16;
    v.depth = 2;
    v.num_heads = 2;
    v.mlp_dim = 32;
    let mut c = ConvNextConfig::tiny().with_num_classes(3);
    c.image_size = 32;
    c.dims = vec![8, 16];
    c.depths = vec![1, 1];
    vec![ClassifierConfig::Vit(v), ClassifierConfig::ConvNext(c)]
}

const CLASSIFIER_KEYS: [&str; 8] = [
    "pos_embed",
    "cls_token",
    "patch_embed.proj.weight",
    "head.weight",
    "head.fc.weight",
    "stem.0.weight",
    "stages.1.downsample.1.weight",
    "blocks.0.attn.qkv.weight",
];

fn use_classifier_checkpoint(
    path: &Path,
    cfg: &gps_seg::models::ClassifierConfig,
) -> Result<(), String> {
    let dev = Device::Cpu;
    let e = |e: gps_seg::Error| e.to_string();
    let (map, _) = cfg.load_checkpoint(path, &dev, 0).map_err(e)?;
    let vs = ParamStore::frozen(map, &dev);
    let model = gps_seg::models::Classifier::new(cfg, &vs).map_err(e)?;
    vs.check_all_used().map_err(e)?;
    let s = cfg.image_size();
    let x = Tensor::zeros((1, 3, s, s), DType::F32, &dev).map_err(|c| c.to_string())?;
    model.forward(&x).map_err(e)?;
    Ok(())
}

#[test]
fn fuzz_classifier_checkpoints() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    let dir = tempfile::tempdir().unwrap();
    for (k, cfg) in micro_classifiers().into_iter().enumerate() {
        let vs = ParamStore::init(&Device::Cpu, 5);
        gps_seg::models::Classifier::new(&cfg, &vs).unwrap();
        let base = vs.current_tensors().unwrap();
        let bytes = tensors::to_safetensors_bytes(&base, None).unwrap();
        let good = dir.path().join("good.safetensors");
        std::fs::write(&good, &bytes).unwrap();
        use_classifier_checkpoint(&good, &cfg).unwrap();
        let started = Instant::now();
        let mut tally = Tally::default();
        for seed in 0..200u64 {
            let mut rng = XorShift::new(seed ^ (0xC1A5 + k as u64));
            let (data, recipe) = mutate_safetensors(&mut rng, &CLASSIFIER_KEYS, &base, &bytes);
            let p = dir.path().join(format!("case{seed}.safetensors"));
            std::fs::write(&p, &data).unwrap();
            tally.run(seed, &recipe, true, || use_classifier_checkpoint(&p, &cfg));
            let _ = std::fs::remove_file(&p);
        }
        assert!(
            tally.errors > 60,
            "{}: only {} refused",
            cfg.name(),
            tally.errors
        );
        tally.finish(&format!("{} checkpoints", cfg.name()), started);
    }
}

// ---------------------------------------------------------------------------------------
// (b) PNG and JPEG.

fn sample_image() -> image::RgbImage {
    image::RgbImage::from_fn(20, 12, |x, y| {
        image::Rgb([(x * 12) as u8, (y * 20) as u8, 90])
    })
}

/// A declared size the pixel checks keep cheap: at most 4096 per side.
const DECLARED: [u32; 6] = [0, 1, 2, 255, 4096, 3];

fn mutate_png(rng: &mut XorShift, base: &[u8]) -> (Vec<u8>, String) {
    let mut out = base.to_vec();
    match rng.below(5) {
        0 => {
            // IHDR (data at 16..29): width, height, bit depth, colour type; CRC fixed.
            let (w, h) = (*rng.pick(&DECLARED), *rng.pick(&DECLARED));
            out[16..20].copy_from_slice(&w.to_be_bytes());
            out[20..24].copy_from_slice(&h.to_be_bytes());
            let mut r = format!("IHDR {w}×{h}");
            if rng.below(2) == 0 {
                let depth = *rng.pick(&[1u8, 2, 4, 8, 16, 3, 0]);
                let colour = *rng.pick(&[0u8, 2, 3, 4, 6, 1, 7]);
                out[24] = depth;
                out[25] = colour;
                r.push_str(&format!(", depth {depth}, colour type {colour}"));
            }
            let crc = crc32(&out[12..29]);
            out[29..33].copy_from_slice(&crc.to_be_bytes());
            (out, r + " (CRC fixed)")
        }
        1 => {
            let r = mutate_region(rng, &mut out, 0, 33);
            (out, format!("header: {r}"))
        }
        2 | 3 => {
            let len = out.len();
            let r = mutate_region(rng, &mut out, 33, len);
            (out, format!("body: {r}"))
        }
        _ => {
            // An in-place edit of a chunk's data with every CRC recomputed, so the decoder
            // gets past its checksums to the data itself.
            let len = out.len();
            let at = 33 + rng.below(len.saturating_sub(45).max(1));
            let r = match rng.below(3) {
                0 => {
                    let bit = rng.below(8);
                    out[at] ^= 1 << bit;
                    format!("flip bit {bit} of byte {at}")
                }
                1 => {
                    let v = *rng.pick(&INTERESTING_U8);
                    out[at] = v;
                    format!("byte {at} = {v:#x}")
                }
                _ => {
                    let end = (at + 1 + rng.below(16)).min(len);
                    out[at..end].fill(0);
                    format!("zero bytes {at}..{end}")
                }
            };
            fix_png_crcs(&mut out);
            (out, format!("body: {r} (CRCs fixed)"))
        }
    }
}

/// Recompute the CRC of every chunk whose length field still fits the file.
fn fix_png_crcs(data: &mut [u8]) {
    let mut pos = 8;
    while pos + 12 <= data.len() {
        let len = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let end = pos + 8 + len;
        if end + 4 > data.len() {
            break;
        }
        let crc = crc32(&data[pos + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        pos = end + 4;
    }
}

fn mutate_jpeg(rng: &mut XorShift, base: &[u8]) -> (Vec<u8>, String) {
    let mut out = base.to_vec();
    let sof = out.windows(2).position(|w| w == [0xFF, 0xC0]);
    match (rng.below(4), sof) {
        (0, Some(at)) if at + 9 <= out.len() => {
            // SOF0: precision, height, width, components.
            let (w, h) = (*rng.pick(&DECLARED) as u16, *rng.pick(&DECLARED) as u16);
            out[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
            out[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
            let mut r = format!("SOF0 {w}×{h}");
            if rng.below(2) == 0 {
                let comps = *rng.pick(&[0u8, 1, 2, 3, 4, 255]);
                out[at + 9] = comps;
                r.push_str(&format!(", {comps} components"));
            }
            (out, r)
        }
        (1, Some(at)) => {
            let r = mutate_region(rng, &mut out, 0, at + 20);
            (out, format!("header: {r}"))
        }
        (2, _) => {
            // Zero the entropy-coded body, keep the end marker.
            let len = out.len();
            let start = out
                .windows(2)
                .rposition(|w| w == [0xFF, 0xDA])
                .unwrap_or(len / 2);
            let end = len.saturating_sub(2);
            if start + 12 < end {
                out[start + 12..end].fill(0);
            }
            (out, "zeroed scan data, end marker kept".into())
        }
        _ => {
            let len = out.len();
            let r = mutate_region(rng, &mut out, len / 4, len);
            (out, format!("body: {r}"))
        }
    }
}

/// A TIFF's first IFD (offset from the little-endian header) and its entry count, if in range.
fn tiff_ifd(data: &[u8]) -> Option<(usize, usize)> {
    let at = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?) as usize;
    let n = u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?) as usize;
    (at + 2 + 12 * n <= data.len()).then_some((at, n))
}

fn mutate_tiff(rng: &mut XorShift, base: &[u8]) -> (Vec<u8>, String) {
    let mut out = base.to_vec();
    let ifd = tiff_ifd(&out);
    match (rng.below(4), ifd) {
        (0, Some((at, n))) => {
            // One IFD entry's value: sizes, bit depth, samples, compression, strip layout.
            let e = at + 2 + 12 * rng.below(n);
            let tag = u16::from_le_bytes([out[e], out[e + 1]]);
            let v = if matches!(tag, 256 | 257) {
                *rng.pick(&DECLARED)
            } else {
                *rng.pick(&INTERESTING_U32)
            };
            out[e + 8..e + 12].copy_from_slice(&v.to_le_bytes());
            (out, format!("IFD tag {tag} value = {v:#x}"))
        }
        (1, Some((at, n))) => {
            let r = mutate_region(rng, &mut out, at, at + 2 + 12 * n);
            (out, format!("IFD: {r}"))
        }
        (2, _) => {
            let r = mutate_region(rng, &mut out, 0, 8);
            (out, format!("header: {r}"))
        }
        _ => {
            let len = out.len();
            let r = mutate_region(rng, &mut out, 8, len);
            (out, format!("body: {r}"))
        }
    }
}

fn decode_all(path: &Path) -> Result<(), String> {
    use gps_seg::data::imgio;
    let e = |e: gps_seg::Error| e.to_string();
    let dims = imgio::dimensions(path);
    let rgb = imgio::decode_rgb(path);
    let luma = imgio::decode_luma(path);
    if let (Ok((h, w)), Ok(img)) = (&dims, &rgb) {
        if (img.height() as usize, img.width() as usize) != (*h, *w) {
            return Err(format!(
                "header says {h}×{w}, decoded {}×{}",
                img.height(),
                img.width()
            ));
        }
    }
    dims.map_err(e)?;
    rgb.map_err(e)?;
    luma.map_err(e)?;
    Ok(())
}

#[test]
fn fuzz_png_and_jpeg_decoding() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image();
    let png = dir.path().join("base.png");
    let jpg = dir.path().join("base.jpg");
    gps_seg::data::imgio::write_png(&png, &img).unwrap();
    gps_seg::data::imgio::write_jpeg_rgb(&jpg, &img, 90).unwrap();
    decode_all(&png).unwrap();
    decode_all(&jpg).unwrap();
    let (png, jpg) = (std::fs::read(&png).unwrap(), std::fs::read(&jpg).unwrap());
    for (ext, base, cases) in [("png", &png, 300u64), ("jpg", &jpg, 300)] {
        let started = Instant::now();
        let mut tally = Tally::default();
        for seed in 0..cases {
            let mut rng = XorShift::new(seed ^ 0xC0FFEE);
            let (data, recipe) = if ext == "png" {
                mutate_png(&mut rng, base)
            } else {
                mutate_jpeg(&mut rng, base)
            };
            let p = dir.path().join(format!("case{seed}.{ext}"));
            std::fs::write(&p, &data).unwrap();
            tally.run(seed, &recipe, false, || decode_all(&p));
            let _ = std::fs::remove_file(&p);
        }
        assert!(
            tally.errors > 20,
            "{ext}: only {} cases refused",
            tally.errors
        );
        tally.finish(ext, started);
    }
}

/// TIFF (read for CVC-ClinicDB's original layout), the same way as PNG and JPEG.
#[test]
fn fuzz_tiff_decoding() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    let dir = tempfile::tempdir().unwrap();
    let tif = dir.path().join("base.tif");
    sample_image().save(&tif).unwrap();
    decode_all(&tif).unwrap();
    let base = std::fs::read(&tif).unwrap();
    assert!(tiff_ifd(&base).is_some(), "base TIFF has no readable IFD");
    let started = Instant::now();
    let mut tally = Tally::default();
    for seed in 0..300u64 {
        let mut rng = XorShift::new(seed ^ 0x71FF);
        let (data, recipe) = mutate_tiff(&mut rng, &base);
        let p = dir.path().join(format!("case{seed}.tif"));
        std::fs::write(&p, &data).unwrap();
        tally.run(seed, &recipe, false, || decode_all(&p));
        let _ = std::fs::remove_file(&p);
    }
    assert!(
        tally.errors > 20,
        "tif: only {} cases refused",
        tally.errors
    );
    tally.finish("tif", started);
}

// ---------------------------------------------------------------------------------------
// (c) ONNX.

fn mutate_onnx(rng: &mut XorShift, base: &[u8]) -> (Vec<u8>, String) {
    use gps_seg::onnx::proto::ModelProto;
    use prost::Message;
    let kind = rng.below(8);
    if kind >= 6 {
        let mut out = base.to_vec();
        let len = out.len();
        let (lo, hi) = if kind == 6 { (0, 64) } else { (0, len) };
        let r = mutate_region(rng, &mut out, lo, hi);
        return (out, format!("bytes: {r}"));
    }
    let mut m = ModelProto::decode(base).unwrap();
    let g = m.graph.as_mut().unwrap();
    let recipe = match kind {
        0 => {
            let i = rng.below(g.node.len());
            let op = *rng.pick(&["Add", "Conv", "Reshape", "Gather", "MatMul", "NoSuchOp", ""]);
            let old = std::mem::replace(&mut g.node[i].op_type, op.to_string());
            format!("node {i} op {old} → `{op}`")
        }
        1 => {
            let i = rng.below(g.node.len());
            let n = g.node.remove(i);
            format!("node {i} ({}) removed", n.op_type)
        }
        2 => {
            let i = rng.below(g.node.len());
            let node = &mut g.node[i];
            if node.input.is_empty() {
                "nothing".into()
            } else {
                let k = rng.below(node.input.len());
                node.input[k] = "no_such_value".into();
                format!("node {i} ({}) input {k} renamed", node.op_type)
            }
        }
        3 => {
            let i = rng.below(g.initializer.len());
            let t = &mut g.initializer[i];
            let d = *rng.pick(&[0i64, -1, 1, 3, 1 << 20]);
            if t.dims.is_empty() {
                t.dims.push(d);
            } else {
                let k = rng.below(t.dims.len());
                t.dims[k] = d;
            }
            format!("initializer `{}` dims → {:?}", t.name, t.dims)
        }
        4 => {
            let i = rng.below(g.initializer.len());
            let t = &mut g.initializer[i];
            if rng.below(2) == 0 {
                let keep = rng.below(t.raw_data.len() + 1);
                t.raw_data.truncate(keep);
                format!("initializer `{}` raw data cut to {keep} bytes", t.name)
            } else {
                t.data_type = *rng.pick(&[0, 7, 10, 11, 99]);
                format!("initializer `{}` data type {}", t.name, t.data_type)
            }
        }
        _ => {
            let with_attr: Vec<usize> = (0..g.node.len())
                .filter(|&i| !g.node[i].attribute.is_empty())
                .collect();
            if with_attr.is_empty() {
                "nothing".into()
            } else {
                let i = *rng.pick(&with_attr);
                let node = &mut g.node[i];
                let k = rng.below(node.attribute.len());
                let a = &mut node.attribute[k];
                let v = *rng.pick(&[0i64, -1, 1 << 40, 3]);
                a.i = v;
                for x in a.ints.iter_mut() {
                    *x = v;
                }
                format!("node {i} ({}) attribute `{}` = {v}", node.op_type, a.name)
            }
        }
    };
    (m.encode_to_vec(), recipe)
}

fn run_onnx(path: &Path) -> Result<(), String> {
    use gps_seg::infer::model::OrtModel;
    use gps_seg::infer::{Engine, OrtEngine};
    let e = |e: gps_seg::Error| e.to_string();
    let model = OrtModel::load(path, 1).map_err(e)?;
    let engine = OrtEngine::from_model(model, 1).map_err(e)?;
    let s = engine.input_size();
    if s == 0 || s > 256 {
        return Err(format!("input size {s}"));
    }
    engine.logits(&vec![0.5f32; 3 * s * s], 1).map_err(e)?;
    Ok(())
}

#[test]
fn fuzz_onnx_models() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    if let Err(e) = gps_seg::infer::runtime::ensure(None, false) {
        eprintln!("SKIPPED the ONNX part: no ONNX Runtime library ({e})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = micro_sam();
    let (m, _) = gps_seg::onnx::sam::export_prompt_free(
        &cfg,
        &micro_weights(),
        gps_seg::onnx::sam::SamExportOptions::default(),
    )
    .unwrap();
    let good: PathBuf = dir.path().join("good.onnx");
    gps_seg::onnx::write_model(&good, m).unwrap();
    run_onnx(&good).unwrap();
    let base = std::fs::read(&good).unwrap();
    let started = Instant::now();
    let mut tally = Tally::default();
    for seed in 0..150u64 {
        let mut rng = XorShift::new(seed ^ 0x0CC5);
        let (data, recipe) = mutate_onnx(&mut rng, &base);
        let p = dir.path().join(format!("case{seed}.onnx"));
        std::fs::write(&p, &data).unwrap();
        tally.run(seed, &recipe, false, || run_onnx(&p));
        let _ = std::fs::remove_file(&p);
    }
    assert!(tally.errors > 20, "only {} cases refused", tally.errors);
    tally.finish("onnx", started);
}

// ---------------------------------------------------------------------------------------
// (d) Task files on a shared base.

/// Mutate a task file: raw bytes, its metadata (the base it names, hashes), or the tensors that
/// carry the GPS patches and the trained weights.
fn mutate_task(rng: &mut XorShift, base: &[u8]) -> (Vec<u8>, String) {
    use gps_seg::onnx::proto::ModelProto;
    use prost::Message;
    let kind = rng.below(7);
    if kind == 6 {
        let mut out = base.to_vec();
        let len = out.len();
        let r = mutate_region(rng, &mut out, 0, len);
        return (out, format!("bytes: {r}"));
    }
    let mut m = ModelProto::decode(base).unwrap();
    let recipe = match kind {
        0 | 1 => {
            let i = rng.below(m.metadata_props.len());
            let e = &mut m.metadata_props[i];
            let v = *rng.pick(&["", "../base.onnx", "/etc/passwd", "base.onnx", "0", "x/y"]);
            e.value = v.to_string();
            format!("metadata `{}` = `{v}`", e.key)
        }
        _ => {
            let g = m.graph.as_mut().unwrap();
            let own: Vec<usize> = (0..g.initializer.len())
                .filter(|&i| {
                    g.initializer[i].name.contains("::gps") || !g.initializer[i].raw_data.is_empty()
                })
                .collect();
            let i = *rng.pick(&own);
            let t = &mut g.initializer[i];
            match kind {
                2 => {
                    let keep = rng.below(t.raw_data.len() + 1);
                    t.raw_data.truncate(keep);
                    format!("`{}` raw data cut to {keep} bytes", t.name)
                }
                3 => {
                    let at = rng.below(t.raw_data.len().max(1));
                    for b in t.raw_data.iter_mut().skip(at).take(8) {
                        *b = 0xff;
                    }
                    format!("`{}` bytes at {at} = 0xff", t.name)
                }
                4 => {
                    let d = *rng.pick(&[0i64, -1, 1, 1 << 40]);
                    if t.dims.is_empty() {
                        t.dims.push(d);
                    } else {
                        let k = rng.below(t.dims.len());
                        t.dims[k] = d;
                    }
                    format!("`{}` dims → {:?}", t.name, t.dims)
                }
                _ => {
                    t.data_type = *rng.pick(&[0, 7, 10, 1, 99]);
                    format!("`{}` data type {}", t.name, t.data_type)
                }
            }
        }
    };
    (m.encode_to_vec(), recipe)
}

fn run_task(path: &Path) -> Result<(), String> {
    use gps_seg::infer::model::OrtModel;
    use gps_seg::infer::{Engine, OrtEngine};
    let e = |e: gps_seg::Error| e.to_string();
    let model = OrtModel::load_shared(path, 1, None).map_err(e)?;
    let engine = OrtEngine::from_model(model, 1).map_err(e)?;
    let s = engine.input_size();
    if s == 0 || s > 256 {
        return Err(format!("input size {s}"));
    }
    engine.logits(&vec![0.5f32; 3 * s * s], 1).map_err(e)?;
    Ok(())
}

#[test]
fn fuzz_task_files() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    if let Err(e) = gps_seg::infer::runtime::ensure(None, false) {
        eprintln!("SKIPPED the task-file part: no ONNX Runtime library ({e})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = micro_sam();
    let w = micro_weights();
    let art = gps_seg::bench::tasks::synthetic_task(&w, 3).unwrap();
    let good: PathBuf = dir.path().join("good.onnx");
    gps_seg::onnx::delta::export_sam_task(
        gps_seg::onnx::delta::SamGraph::PromptFree,
        &cfg,
        &w,
        &art,
        gps_seg::onnx::sam::SamExportOptions::default(),
        &dir.path().join("base.onnx"),
        &good,
    )
    .unwrap();
    run_task(&good).unwrap();
    let base = std::fs::read(&good).unwrap();
    let started = Instant::now();
    let mut tally = Tally::default();
    for seed in 0..150u64 {
        let mut rng = XorShift::new(seed ^ 0x7A5C);
        let (data, recipe) = mutate_task(&mut rng, &base);
        let p = dir.path().join(format!("case{seed}.onnx"));
        std::fs::write(&p, &data).unwrap();
        // Every panic fails: loading a task is our code end to end (the base is intact).
        tally.run(seed, &recipe, true, || {
            gps_seg::onnx::integrity::verify_model_file(&p).map_err(|e| e.to_string())?;
            run_task(&p)
        });
        let _ = std::fs::remove_file(&p);
    }
    assert!(tally.errors > 40, "only {} cases refused", tally.errors);
    tally.finish("task", started);
}

// ---------------------------------------------------------------------------------------
// (e) Shard reports of `infer --shard` for `report merge`.

const INTERESTING_JSON: [&str; 16] = [
    "-1",
    "0",
    "1",
    "999",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e308",
    "-0.5",
    "null",
    "\"\"",
    "\"x\"",
    "[]",
    "{}",
    "true",
    "4294967296",
];

/// A random leaf (or container) of `v` replaced by an interesting value, removed, or repeated.
fn mutate_json_value(rng: &mut XorShift, v: &mut serde_json::Value) -> String {
    // Walk down a few levels at random (read-only), as a JSON pointer.
    let mut path = String::new();
    {
        let mut cur: &serde_json::Value = v;
        for _ in 0..1 + rng.below(5) {
            let next = match cur {
                serde_json::Value::Object(m) if !m.is_empty() => {
                    let (k, n) = m.iter().nth(rng.below(m.len())).unwrap();
                    path.push_str(&format!("/{}", k.replace('~', "~0").replace('/', "~1")));
                    n
                }
                serde_json::Value::Array(a) if !a.is_empty() => {
                    let i = rng.below(a.len());
                    path.push_str(&format!("/{i}"));
                    &a[i]
                }
                _ => break,
            };
            cur = next;
        }
    }
    let cur = v.pointer_mut(&path).unwrap();
    match rng.below(4) {
        0 => {
            if let serde_json::Value::Object(m) = cur {
                if !m.is_empty() {
                    let k = m.keys().nth(rng.below(m.len())).cloned().unwrap();
                    m.remove(&k);
                    return format!("{path}: remove key `{k}`");
                }
            }
            if let serde_json::Value::Array(a) = cur {
                if !a.is_empty() {
                    let i = rng.below(a.len());
                    a.remove(i);
                    return format!("{path}: remove element {i}");
                }
            }
            *cur = serde_json::Value::Null;
            format!("{path} = null")
        }
        1 => {
            if let serde_json::Value::Array(a) = cur {
                if !a.is_empty() {
                    let i = rng.below(a.len());
                    let e = a[i].clone();
                    a.push(e);
                    return format!("{path}: repeat element {i}");
                }
            }
            let t = *rng.pick(&INTERESTING_JSON);
            *cur = serde_json::from_str(t).unwrap_or(serde_json::Value::Null);
            format!("{path} = {t}")
        }
        _ => {
            let t = *rng.pick(&INTERESTING_JSON);
            *cur = serde_json::from_str(t).unwrap_or(serde_json::Value::Null);
            format!("{path} = {t}")
        }
    }
}

/// Mutate JSON text: raw bytes (1 in 4), else one structural edit of the parsed value.
fn mutate_json_text(rng: &mut XorShift, base: &[u8]) -> (Vec<u8>, String) {
    if rng.below(4) == 0 {
        let mut out = base.to_vec();
        let len = out.len();
        let r = mutate_region(rng, &mut out, 0, len);
        return (out, format!("bytes: {r}"));
    }
    let mut v: serde_json::Value = serde_json::from_slice(base).unwrap();
    let mut recipe = Vec::new();
    for _ in 0..1 + rng.below(2) {
        recipe.push(mutate_json_value(rng, &mut v));
    }
    (v.to_string().into_bytes(), recipe.join("; "))
}

#[test]
fn fuzz_shard_reports() {
    use gps_seg::data::imgio;
    use gps_seg::infer::{infer, input, InferOptions};
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    let dir = tempfile::tempdir().unwrap();
    let (img, msk) = (dir.path().join("images"), dir.path().join("masks"));
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&msk).unwrap();
    for k in 0..5u32 {
        let (w, h) = (12 + k, 9 + 2 * k);
        let im = image::RgbImage::from_fn(w, h, |x, y| {
            let v = if x < w / 2 + k && y < h / 2 { 250 } else { 10 };
            image::Rgb([v, v, v])
        });
        let m = image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if x + k >= w / 3 && y < h / 2 + k {
                255
            } else {
                0
            }])
        });
        imgio::write_png(&img.join(format!("i{k}.png")), &im).unwrap();
        imgio::write_png(&msk.join(format!("i{k}.png")), &m).unwrap();
    }
    let (c, bad) = input::from_folders(&img, Some(&msk)).unwrap();
    let inputs = input::check(c, bad);
    let mut shards = Vec::new();
    for i in 0..2 {
        let mut o = InferOptions::new(dir.path().join(format!("shard{i}")));
        o.overlays = false;
        o.batch_size = 2;
        o.shard = Some(gps_seg::infer::job::Shard::new(i, 2).unwrap());
        infer(
            &common::Brightness(8),
            &inputs,
            &o,
            &mut gps_seg::progress::Silent,
        )
        .unwrap();
        shards.push(o.out);
    }
    let merge = |a: &Path, b: &Path, out: &Path| -> Result<(), String> {
        gps_seg::infer::report::merge_reports(&[a.to_path_buf(), b.to_path_buf()], out)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    merge(&shards[0], &shards[1], &dir.path().join("good")).unwrap();
    let base = std::fs::read(shards[0].join("report.json")).unwrap();
    let started = Instant::now();
    let mut tally = Tally::default();
    for seed in 0..300u64 {
        let mut rng = XorShift::new(seed ^ 0x5AD);
        let (data, recipe) = mutate_json_text(&mut rng, &base);
        let case = dir.path().join(format!("case{seed}"));
        std::fs::create_dir_all(&case).unwrap();
        std::fs::write(case.join("report.json"), &data).unwrap();
        let out = dir.path().join(format!("out{seed}"));
        // Merging is our code end to end: every panic fails.
        tally.run(seed, &recipe, true, || {
            let a = merge(&case, &shards[1], &out);
            let b = merge(&shards[1], &case, &out.with_extension("b"));
            a.and(b)
        });
        let _ = std::fs::remove_dir_all(&case);
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(out.with_extension("b"));
    }
    assert!(tally.errors > 150, "only {} cases refused", tally.errors);
    tally.finish("shard report", started);
}

// ---------------------------------------------------------------------------------------
// (f) Prompt files (JSON and CSV) for `infer --prompts`.

/// Edit CSV text: raw bytes, or a field replaced by an interesting token.
fn mutate_csv(rng: &mut XorShift, base: &str) -> (Vec<u8>, String) {
    const TOKENS: [&str; 16] = [
        "",
        "\"",
        "\"\"",
        "\"a,b\"",
        "-1",
        "1e39",
        "NaN",
        "inf",
        "-0",
        "99999999999",
        "\u{feff}",
        "box",
        "pos",
        "neg",
        "id",
        "\"unterminated",
    ];
    if rng.below(3) == 0 {
        let mut out = base.as_bytes().to_vec();
        let len = out.len();
        let r = mutate_region(rng, &mut out, 0, len);
        return (out, format!("bytes: {r}"));
    }
    let mut lines: Vec<Vec<String>> = base
        .lines()
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    let li = rng.below(lines.len());
    let line = &mut lines[li];
    let recipe = match rng.below(3) {
        0 => {
            let fi = rng.below(line.len());
            let t = *rng.pick(&TOKENS);
            line[fi] = t.to_string();
            format!("line {li} field {fi} = `{t}`")
        }
        1 => {
            let t = *rng.pick(&TOKENS);
            line.push(t.to_string());
            format!("line {li}: extra field `{t}`")
        }
        _ => {
            let fi = rng.below(line.len());
            line.remove(fi);
            format!("line {li}: field {fi} removed")
        }
    };
    let text: Vec<String> = lines.iter().map(|l| l.join(",")).collect();
    (text.join("\n").into_bytes(), recipe)
}

fn use_prompt_file(path: &Path) -> Result<(), String> {
    use gps_seg::data::prompts::{check_against_images, read_prompt_file, to_input_frame};
    let file = read_prompt_file(path).map_err(|e| e.to_string())?;
    let sizes: std::collections::HashMap<&str, (usize, usize)> =
        [("a", (20, 40)), ("b", (64, 48))].into_iter().collect();
    check_against_images(&file, &sizes, &Default::default()).map_err(|e| e.to_string())?;
    for (id, objs) in &file {
        let (h, w) = sizes[id.as_str()];
        let frame = to_input_frame(objs, (32.0 / h as f32, 32.0 / w as f32));
        if frame.len() != objs.len() {
            return Err("objects lost".into());
        }
    }
    Ok(())
}

#[test]
fn fuzz_prompt_files() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{"a": [{"box": [1, 2, 30, 15], "points": [[5, 6], [7, 8]], "labels": [1, 0]}], "b": [{"points": [[40, 60]], "labels": [1]}, {"box": [0, 0, 48, 64]}]}"#;
    let csv =
        "id,kind,x0,y0,x1,y1\na,box,1,2,30,15\na,pos,5,6\na,neg,7,8\nb,pos,40,60\nb,box,0,0,48,64";
    for (name, text) in [("good.json", json), ("good.csv", csv)] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        use_prompt_file(&p).unwrap();
    }
    let started = Instant::now();
    let mut tally = Tally::default();
    for seed in 0..400u64 {
        let mut rng = XorShift::new(seed ^ 0x9A0);
        let (data, recipe, ext) = if seed % 2 == 0 {
            let (d, r) = mutate_json_text(&mut rng, json.as_bytes());
            (d, format!("json: {r}"), "json")
        } else {
            let (d, r) = mutate_csv(&mut rng, csv);
            (d, format!("csv: {r}"), "csv")
        };
        let p = dir.path().join(format!("case{seed}.{ext}"));
        std::fs::write(&p, &data).unwrap();
        // Reading and checking prompts is our code end to end: every panic fails.
        tally.run(seed, &recipe, true, || use_prompt_file(&p));
        let _ = std::fs::remove_file(&p);
    }
    assert!(tally.errors > 150, "only {} cases refused", tally.errors);
    tally.finish("prompt file", started);
}
