//! `gps-seg serve` against servers started in-process on ephemeral 127.0.0.1 ports with tiny
//! models: the served mask is byte-identical to the PNG `infer` writes for the same image and
//! model (each of two tasks its own); bad input gets a 4xx with a message and the server keeps
//! serving; a full task answers 503 + Retry-After; a stalled request 504; shutdown lets an
//! in-flight request finish; one memory budget holds every task's requests (503 when full,
//! given back on answer, timeout and disconnect); slow headers and idle connections are closed;
//! an answer sent before the body is read reaches an uploading client; a half-closed request
//! is answered, one cut mid-body counted as aborted. Requests go through the library's minimal
//! HTTP/1.1 client or raw `TcpStream` writes (partial bodies, garbage, trickled headers).
//!
//! The ONNX Runtime library is found in the runtime's search order and fetched once when
//! missing (as `gps-seg infer` does).

mod common;

use common::{crc32, infer_mask};
use gps_seg::data::imgio;
use gps_seg::data::synth_kvasir::render;
use gps_seg::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use gps_seg::onnx::write_model;
use gps_seg::progress::Silent;
use gps_seg::sam::SamConfig;
use gps_seg::serve::client::{self, Response};
use gps_seg::serve::wire::base64;
use gps_seg::serve::{ServeConfig, Server, TaskSpec};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Two prompt-free models (the shipped pretrained sam-tiny at 128 px, a random-init tiny SAM
/// at 64 px) and test images (PNG and JPEG, odd sizes), made once per test process.
struct Fixture {
    _dir: tempfile::TempDir,
    pretrained: PathBuf,
    /// sam-tiny's image encoder, with `prompted_decoder.onnx` beside it.
    prompted: PathBuf,
    random: PathBuf,
    png: PathBuf,
    jpeg: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        common::ort_ready();
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg: SamConfig = gps_seg::util::fs::read_json(&root.join("sam/sam-tiny.json")).unwrap();
        let w = gps_seg::util::tensors::load(
            &root.join("sam/sam-tiny.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (m, _) = export_prompt_free(&cfg, &w, SamExportOptions::default()).unwrap();
        let pretrained = dir.path().join("pretrained.onnx");
        write_model(&pretrained, m).unwrap();
        let (m, _) =
            gps_seg::onnx::sam::export_image_encoder(&cfg, &w, SamExportOptions::default())
                .unwrap();
        let prompted = dir.path().join("prompted.onnx");
        write_model(&prompted, m).unwrap();
        let (m, _) = gps_seg::onnx::sam::export_prompted_decoder(&cfg, &w).unwrap();
        write_model(&dir.path().join("prompted_decoder.onnx"), m).unwrap();
        let rcfg = SamConfig::tiny().with_image_size(64);
        let (m, _) = export_prompt_free(
            &rcfg,
            &random_sam_weights(&rcfg, 7).unwrap(),
            SamExportOptions::default(),
        )
        .unwrap();
        let random = dir.path().join("random.onnx");
        write_model(&random, m).unwrap();
        let imgs = dir.path().join("images");
        std::fs::create_dir_all(&imgs).unwrap();
        let a = render(3, 0, 200);
        let b = render(3, 1, 180);
        let png = imgs.join("a.png");
        let jpeg = imgs.join("b.jpg");
        imgio::write_png(&png, &a.image).unwrap();
        imgio::write_jpeg_rgb(&jpeg, &b.image, 90).unwrap();
        Fixture {
            _dir: dir,
            pretrained,
            prompted,
            random,
            png,
            jpeg,
        }
    })
}

fn config(tasks: &[(&str, &Path)]) -> ServeConfig {
    let mut c = ServeConfig::new(
        tasks
            .iter()
            .map(|(n, p)| TaskSpec {
                name: n.to_string(),
                model: p.to_path_buf(),
            })
            .collect(),
    );
    c.port = 0;
    c.threads = 1;
    c
}

fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    client::request(addr, "POST", path, headers, body).unwrap()
}

fn get(addr: SocketAddr, path: &str) -> Response {
    client::request(addr, "GET", path, &[], &[]).unwrap()
}

#[test]
fn each_task_serves_the_mask_infer_writes_byte_for_byte() {
    let f = fixture();
    let server = Server::bind(
        &config(&[("polyp", &f.pretrained), ("other", &f.random)]),
        &mut Silent,
    )
    .unwrap();
    let addr = server.addr();
    let tmp = tempfile::tempdir().unwrap();
    let mut served = Vec::new();
    for (task, model) in [("polyp", &f.pretrained), ("other", &f.random)] {
        for (k, img) in [&f.png, &f.jpeg].into_iter().enumerate() {
            let bytes = std::fs::read(img).unwrap();
            let want = infer_mask(model, img, &tmp.path().join(format!("{task}-{k}")));
            let r = post(addr, &format!("/v1/segment?task={task}"), &[], &bytes);
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("content-type"), Some("image/png"));
            assert!(
                r.body == want,
                "task {task}, {}: served mask differs from infer's",
                img.display()
            );
            // The summary headers describe this mask.
            let decoded = image::load_from_memory(&r.body).unwrap().to_luma8();
            let (w, h) = imgio::decode_rgb(img).unwrap().dimensions();
            assert_eq!(decoded.dimensions(), (w, h), "original resolution");
            let area = decoded.as_raw().iter().filter(|&&v| v == 255).count();
            assert_eq!(r.header("x-mask-area"), Some(area.to_string().as_str()));
            let res: serde_json::Value =
                serde_json::from_str(r.header("x-result").unwrap()).unwrap();
            assert_eq!(res["mask_area"], area);
            assert_eq!(res["task"], task);
            let p: f64 = r.header("x-mean-probability").unwrap().parse().unwrap();
            assert!((0.0..=1.0).contains(&p));
            assert!(r.header("x-inference-ms").unwrap().parse::<f64>().unwrap() > 0.0);
            // Multipart carries the same image to the same mask; JSON holds it in base64.
            let boundary = "gpsSegBoundary7";
            let mut mp = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .into_bytes();
            mp.extend_from_slice(&bytes);
            mp.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
            let ct = format!("multipart/form-data; boundary={boundary}");
            let r = post(
                addr,
                &format!("/v1/segment?task={task}&format=json"),
                &[("Content-Type", &ct)],
                &mp,
            );
            assert_eq!(r.status, 200, "{}", r.text());
            let j: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(j["mask_png_base64"], base64(&want));
            assert_eq!(j["mask_area"], area);
            assert_eq!(j["width"], w);
            served.push(want);
        }
    }
    // Different models, different masks (the pretrained one finds the polyp).
    assert_ne!(served[0], served[2]);
    assert_ne!(served[1], served[3]);

    // The other routes.
    assert_eq!(get(addr, "/healthz").text(), "ok\n");
    let t: serde_json::Value = serde_json::from_slice(&get(addr, "/v1/tasks").body).unwrap();
    let names: Vec<&str> = t["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other", "polyp"]);
    assert_eq!(t["tasks"][1]["input_size"], 128);
    assert_eq!(t["tasks"][0]["input_size"], 64);
    let m = get(addr, "/metrics").text();
    assert!(
        m.contains("gps_seg_requests_total{task=\"polyp\",code=\"200\"} 4"),
        "{m}"
    );
    assert!(m.contains("gps_seg_request_duration_seconds{task=\"other\",quantile=\"0.99\"}"));
    assert!(m.contains("gps_seg_in_flight{task=\"polyp\"} 0"));
    let page = get(addr, "/");
    assert!(page.text().contains("id=\"overlay\""));
    let sample = get(addr, "/v1/sample.png");
    assert_eq!(sample.header("content-type"), Some("image/png"));
    assert!(image::load_from_memory(&sample.body).is_ok());
    server.shutdown().unwrap();
}

/// `png` with its IHDR saying `w × h` (CRC fixed, pixel data unchanged).
fn png_declaring(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut p = png.to_vec();
    // signature (8) + length (4) + "IHDR" (4) → width at 16, height at 20, CRC at 29.
    p[16..20].copy_from_slice(&w.to_be_bytes());
    p[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&p[12..29]);
    p[29..33].copy_from_slice(&crc.to_be_bytes());
    p
}

/// A 16 × 16 grey PNG whose compressed iCCP chunk holds `profile` zero bytes (a few KB).
fn png_with_icc(profile: usize) -> Vec<u8> {
    use image::ImageEncoder;
    let img = image::GrayImage::from_pixel(16, 16, image::Luma([90]));
    let mut buf = Vec::new();
    let mut enc = image::codecs::png::PngEncoder::new(&mut buf);
    enc.set_icc_profile(vec![0u8; profile]).unwrap();
    enc.write_image(img.as_raw(), 16, 16, image::ExtendedColorType::L8)
        .unwrap();
    buf
}

/// A flat 16-bit RGB PNG of `w × h`: a small file, `w·h·6` bytes decoded.
fn png16(w: u32, h: u32) -> Vec<u8> {
    let img = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
        w,
        h,
        image::Rgb([9000u16, 30000, 700]),
    );
    let mut buf = Vec::new();
    image::DynamicImage::ImageRgb16(img)
        .write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
        .unwrap();
    buf
}

/// Raw bytes on a fresh connection; the status code of the answer (0: closed without one).
fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[test]
fn bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving() {
    let f = fixture();
    let mut cfg = config(&[("a", &f.random)]);
    cfg.max_body_bytes = 1 << 20;
    let server = Server::bind(&cfg, &mut Silent).unwrap();
    let addr = server.addr();
    let png = std::fs::read(&f.png).unwrap();
    let jpeg = std::fs::read(&f.jpeg).unwrap();
    let seg = "/v1/segment?task=a";
    let ok = || {
        let r = post(addr, seg, &[("Content-Type", "image/png")], &png);
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let cases: Vec<(&str, Response, u16, &str)> = vec![
        (
            "empty body",
            post(addr, seg, &[], b""),
            400,
            "empty request body",
        ),
        (
            "garbage",
            post(addr, seg, &[], b"this is not an image at all"),
            400,
            "unreadable or corrupt image",
        ),
        (
            "truncated PNG",
            post(addr, seg, &[], &png[..png.len() / 2]),
            400,
            "request body",
        ),
        (
            "truncated JPEG",
            post(addr, seg, &[], &jpeg[..jpeg.len() - 300]),
            400,
            "truncated JPEG",
        ),
        (
            "huge declared size",
            post(addr, seg, &[], &png_declaring(&png, 100_000, 100_000)),
            400,
            "refused before decoding",
        ),
        (
            "ICC profile bomb",
            post(addr, seg, &[], &png_with_icc(40 << 20)),
            400,
            "request body: unreadable or corrupt image: PNG chunk iCCP of",
        ),
        (
            "unknown task",
            post(addr, "/v1/segment?task=nope", &[], &png),
            404,
            "unknown task `nope` (tasks: `a`)",
        ),
        (
            "no task",
            post(addr, "/v1/segment", &[], &png),
            400,
            "missing ?task=NAME",
        ),
        (
            "bad format",
            post(addr, "/v1/segment?task=a&format=tiff", &[], &png),
            400,
            "format `tiff`",
        ),
        (
            "unknown parameter",
            post(addr, "/v1/segment?task=a&point=1,2", &[], &png),
            400,
            "unknown query parameter `point`",
        ),
        (
            "bad escape",
            post(addr, "/v1/segment?task=%zz", &[], &png),
            400,
            "percent escape",
        ),
        (
            "JSON body",
            post(addr, seg, &[("Content-Type", "application/json")], b"{}"),
            415,
            "Content-Type `application/json`",
        ),
        (
            "multipart without the file",
            post(
                addr,
                seg,
                &[("Content-Type", "multipart/form-data; boundary=B")],
                b"--B\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--B--\r\n",
            ),
            400,
            "no field `file`",
        ),
        (
            "multipart truncated",
            post(
                addr,
                seg,
                &[("Content-Type", "multipart/form-data; boundary=B")],
                b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\x89PNG",
            ),
            400,
            "not closed by its boundary",
        ),
        (
            "wrong method",
            get(addr, seg),
            405,
            "method GET is not allowed on /v1/segment (use POST)",
        ),
        (
            "wrong method on a GET route",
            post(addr, "/v1/tasks", &[], b""),
            405,
            "(use GET)",
        ),
        (
            "unknown route",
            get(addr, "/v2/whatever"),
            404,
            "no route GET /v2/whatever",
        ),
    ];
    for (what, r, code, msg) in &cases {
        assert_eq!(r.status, *code, "{what}: {}", r.text());
        assert!(
            r.text().contains(msg),
            "{what}: `{}` lacks `{msg}`",
            r.text()
        );
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{what}"
        );
    }
    ok();
    // A declared body over the limit is refused before it is read.
    let (code, text) = raw(
        addr,
        format!("POST {seg} HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n").as_bytes(),
    );
    assert_eq!(code, 413, "{text}");
    assert!(
        text.contains("over the limit of 1048576 bytes (--max-body-bytes)"),
        "{text}"
    );
    // Chunked body over the limit (no Content-Length to refuse up front).
    let mut chunked = format!(
        "POST {seg} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..2 {
        chunked.extend_from_slice(format!("{:x}\r\n", 600_000).as_bytes());
        chunked.extend(std::iter::repeat_n(b'z', 600_000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (code, text) = raw(addr, &chunked);
    assert_eq!(code, 413, "{text}");
    // Not HTTP at all, and a request cut off mid-headers: answered or closed, never a crash.
    let (code, _) = raw(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(code == 0 || (400..500).contains(&code), "{code}");
    let (code, _) = raw(addr, b"POST /v1/segment?task=a HTTP/1.1\r\nContent-Le");
    assert!(code == 0 || (400..500).contains(&code), "{code}");
    // Seeded mutations of a valid PNG and JPEG: an answer below 500 every time.
    let mut rng = gps_seg::util::Rng::new(11);
    for i in 0..40 {
        let mut b = if i % 2 == 0 {
            png.clone()
        } else {
            jpeg.clone()
        };
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(b.len());
            b[at] = rng.below(256) as u8;
        }
        if i % 5 == 0 {
            let cut = rng.below(b.len());
            b.truncate(cut);
        }
        let r = post(addr, seg, &[], &b);
        assert!(
            r.status < 500 && r.status != 0,
            "mutation {i}: {} {}",
            r.status,
            r.text()
        );
        if r.status != 200 {
            assert!(!r.text().trim().is_empty(), "mutation {i}: no message");
        }
    }
    // Still serving.
    ok();
    assert_eq!(get(addr, "/healthz").status, 200);
    server.shutdown().unwrap();
}

/// Send the head of a POST and the first `sent` bytes of `body`; the rest is sent later.
fn start_upload(addr: SocketAddr, path: &str, body: &[u8], sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..sent]).unwrap();
    s.flush().unwrap();
    s
}

/// The head of a POST declaring `len` body bytes, and the first `sent` of them (zeros).
fn start_declared(addr: SocketAddr, path: &str, len: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![0u8; sent]).unwrap();
    s
}

fn finish_upload(mut s: TcpStream, rest: &[u8]) -> (u16, String) {
    let _ = s.write_all(rest);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// Wait until `/metrics` shows `line`.
fn wait_metric(addr: SocketAddr, line: &str) {
    let t0 = Instant::now();
    while !get(addr, "/metrics").text().contains(line) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "metrics never showed `{line}`"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_full_task_answers_503_with_retry_after_and_recovers() {
    let f = fixture();
    let mut cfg = config(&[("a", &f.random), ("b", &f.pretrained)]);
    cfg.sessions = 1;
    cfg.queue = 0;
    let server = Server::bind(&cfg, &mut Silent).unwrap();
    let addr = server.addr();
    let png = std::fs::read(&f.png).unwrap();
    // Request 1 is admitted (it holds task a's one place while its body arrives).
    let held = start_upload(addr, "/v1/segment?task=a", &png, 100);
    wait_metric(addr, "gps_seg_queue_depth{task=\"a\"} 1");
    let r = post(addr, "/v1/segment?task=a", &[], &png);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.text().contains("task `a` is full"), "{}", r.text());
    // Another task is not affected.
    assert_eq!(post(addr, "/v1/segment?task=b", &[], &png).status, 200);
    let (code, text) = finish_upload(held, &png[100..]);
    assert_eq!(code, 200, "{text}");
    assert_eq!(post(addr, "/v1/segment?task=a", &[], &png).status, 200);
    let m = get(addr, "/metrics").text();
    assert!(
        m.contains("gps_seg_requests_total{task=\"a\",code=\"503\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("gps_seg_requests_total{task=\"a\",code=\"200\"} 2"),
        "{m}"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_stalled_request_times_out_with_504_and_shutdown_finishes_in_flight_requests() {
    let f = fixture();
    let mut cfg = config(&[("a", &f.random)]);
    cfg.timeout = Duration::from_millis(800);
    let server = Server::bind(&cfg, &mut Silent).unwrap();
    let addr = server.addr();
    let png = std::fs::read(&f.png).unwrap();
    let stalled = start_upload(addr, "/v1/segment?task=a", &png, 10);
    let mut out = Vec::new();
    let mut s = stalled;
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(
        text.contains("no answer within 0.8 s (--timeout-s)"),
        "{text}"
    );

    // An upload in flight when shutdown starts still gets its answer.
    let inflight = start_upload(addr, "/v1/segment?task=a", &png, 50);
    wait_metric(addr, "gps_seg_queue_depth{task=\"a\"} 1");
    let stopper = std::thread::spawn(move || server.shutdown());
    std::thread::sleep(Duration::from_millis(200));
    let (code, text) = finish_upload(inflight, &png[50..]);
    assert_eq!(code, 200, "{text}");
    stopper.join().unwrap().unwrap();
    assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
}

#[test]
fn one_memory_budget_holds_every_tasks_requests_and_gives_it_back() {
    let f = fixture();
    let mut cfg = config(&[("a", &f.random), ("b", &f.random)]);
    cfg.max_body_bytes = 4 << 20;
    cfg.max_inflight_bytes = 4 << 20;
    cfg.timeout = Duration::from_secs(6);
    let server = Server::bind(&cfg, &mut Silent).unwrap();
    let addr = server.addr();
    // 600×600 16-bit RGB: a 9 KB file, 2.16 MB decoded plus 1.08 MB as 8-bit RGB.
    let big = png16(600, 600);
    assert!(big.len() < 100_000, "{}", big.len());
    let small = std::fs::read(&f.png).unwrap();
    assert_eq!(post(addr, "/v1/segment?task=b", &[], &big).status, 200);
    // An upload to task a declares 3 MB: its body is held in the budget while it arrives.
    let held = start_declared(addr, "/v1/segment?task=a", 3_000_000, 100);
    wait_metric(addr, "gps_seg_inflight_bytes 3000000\n");
    // Task b's image does not fit beside it (another task, the same budget).
    let r = post(addr, "/v1/segment?task=b", &[], &big);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.text().contains("a 600×600 image") && r.text().contains("(--max-inflight-bytes)"),
        "{}",
        r.text()
    );
    // A small image still fits: the budget counts bytes, not requests.
    assert_eq!(post(addr, "/v1/segment?task=b", &[], &small).status, 200);
    // A declared body that does not fit is refused before it is read.
    let r = post(addr, "/v1/segment?task=b", &[], &vec![0u8; 2_000_000]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("task `b`: the server's memory budget"),
        "{}",
        r.text()
    );
    // An image that could never fit is 413, not worth a retry.
    let r = post(addr, "/v1/segment?task=b", &[], &png16(1000, 1000));
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text().contains("more than the server's whole budget"),
        "{}",
        r.text()
    );
    // The held upload times out (504) and gives its bytes back; so does a client that goes
    // away mid-body.
    let (code, text) = finish_upload(held, &[]);
    assert_eq!(code, 504, "{text}");
    wait_metric(addr, "gps_seg_inflight_bytes 0\n");
    let gone = start_declared(addr, "/v1/segment?task=a", 3_000_000, 100);
    wait_metric(addr, "gps_seg_inflight_bytes 3000000\n");
    drop(gone);
    wait_metric(addr, "gps_seg_inflight_bytes 0\n");
    assert_eq!(post(addr, "/v1/segment?task=b", &[], &big).status, 200);
    let m = get(addr, "/metrics").text();
    for line in [
        "gps_seg_inflight_bytes_limit 4194304\n",
        "gps_seg_budget_refused_total 3\n",
        "gps_seg_requests_total{task=\"b\",code=\"503\"} 2\n",
        "gps_seg_requests_aborted_total{task=\"a\"} 1\n",
    ] {
        assert!(m.contains(line), "{line}: {m}");
    }
    server.shutdown().unwrap();
}

/// Read until the server closes `s`; true when it did (end of stream or reset) before the
/// socket's read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slow_headers_and_idle_keep_alive_connections_are_closed() {
    let f = fixture();
    let mut cfg = config(&[("a", &f.random)]);
    cfg.header_timeout = Duration::from_millis(1500);
    cfg.idle_timeout = Duration::from_millis(1500);
    let server = Server::bind(&cfg, &mut Silent).unwrap();
    let addr = server.addr();
    let open = |first: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        s.write_all(first).unwrap();
        s
    };
    let t0 = Instant::now();
    // Slowloris: 20 connections with part of a request's headers, one more trickling a byte
    // every 300 ms, one that sends nothing, and an idle keep-alive connection.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| open(b"POST /v1/segment?task=a HTTP/1.1\r\nHost: x\r\n"))
        .collect();
    let mut trickle = open(b"GET /healthz HTTP/1.1\r\n");
    let mut silent = open(b"");
    let mut idle = open(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = [0u8; 256];
    let n = idle.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"HTTP/1.1 200"));
    // A keep-alive client asking every 300 ms is served throughout (2.4 s, longer than
    // both timeouts: the idle wait restarts after every answer).
    let mut c = client::Client::connect(addr, Duration::from_secs(10)).unwrap();
    for _ in 0..8 {
        assert_eq!(c.send("GET", "/healthz", &[], b"").unwrap().status, 200);
        std::thread::sleep(Duration::from_millis(300));
        let _ = trickle.write_all(b"X");
    }
    let closed_trickle =
        trickle.write_all(b"X-More: 1\r\n").is_err() || closed_by_server(&mut trickle);
    assert!(closed_trickle, "the trickling connection is still open");
    for (i, s) in slow.iter_mut().enumerate() {
        assert!(closed_by_server(s), "slow connection {i} is still open");
    }
    assert!(
        closed_by_server(&mut silent),
        "a silent connection is still open"
    );
    assert!(
        closed_by_server(&mut idle),
        "an idle keep-alive connection is still open"
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    let m = get(addr, "/metrics").text();
    let count = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("gps_seg_connections_header_timeout_total") >= 22,
        "{m}"
    );
    assert!(count("gps_seg_connections_idle_timeout_total") >= 1, "{m}");
    server.shutdown().unwrap();
}

#[test]
fn an_answer_before_the_body_is_read_reaches_the_uploading_client() {
    let f = fixture();
    let mut cfg = config(&[("a", &f.random)]);
    cfg.sessions = 1;
    cfg.queue = 0;
    let server = Server::bind(&cfg, &mut Silent).unwrap();
    let addr = server.addr();
    let png = std::fs::read(&f.png).unwrap();
    // Task a's one place is held, so every other upload is answered 503 before its body is
    // read; each client writes its whole 24 MiB body, then reads.
    let held = start_upload(addr, "/v1/segment?task=a", &png, 100);
    wait_metric(addr, "gps_seg_queue_depth{task=\"a\"} 1");
    let body = vec![7u8; 24 << 20];
    for i in 0..4 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let head = format!(
            "POST /v1/segment?task=a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = s
            .write_all(head.as_bytes())
            .and_then(|()| s.write_all(&body));
        assert!(sent.is_ok(), "upload {i}: {sent:?}");
        let mut out = Vec::new();
        let read = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(read.is_ok(), "upload {i}: {read:?}, got `{text}`");
        assert!(text.starts_with("HTTP/1.1 503"), "upload {i}: `{text}`");
        let lower = text.to_ascii_lowercase();
        assert!(
            lower.contains("\r\nconnection: close\r\n"),
            "upload {i}: `{text}`"
        );
        assert!(
            lower.contains("\r\nretry-after: 1\r\n"),
            "upload {i}: `{text}`"
        );
    }
    // A keep-alive client sees the 503 and its next request goes out on a new connection.
    let mut c = client::Client::connect(addr, Duration::from_secs(20)).unwrap();
    let r = c.send("POST", "/v1/segment?task=a", &[], &png).unwrap();
    assert_eq!((r.status, r.header("connection")), (503, Some("close")));
    assert_eq!(c.send("GET", "/healthz", &[], b"").unwrap().status, 200);
    let (code, text) = finish_upload(held, &png[100..]);
    assert_eq!(code, 200, "{text}");
    let m = get(addr, "/metrics").text();
    assert!(
        m.contains("gps_seg_connections_closed_unread_total 5\n"),
        "{m}"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_half_closed_request_is_answered_and_one_cut_mid_body_is_counted() {
    let f = fixture();
    let server = Server::bind(&config(&[("a", &f.random)]), &mut Silent).unwrap();
    let addr = server.addr();
    let png = std::fs::read(&f.png).unwrap();
    let seg = "/v1/segment?task=a";
    // The whole request, then the client shuts down its write side: still answered.
    let mut req = format!(
        "POST {seg} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
        png.len()
    )
    .into_bytes();
    req.extend_from_slice(&png);
    let (code, text) = raw(addr, &req);
    assert_eq!(code, 200, "{text}");
    // Half-closed mid-body: a 400 saying so, and counted as aborted.
    let s = start_upload(addr, seg, &png, 100);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (code, text) = finish_upload(s, &[]);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("could not read the request body"), "{text}");
    let m = get(addr, "/metrics").text();
    for line in [
        "gps_seg_requests_total{task=\"a\",code=\"200\"} 1\n",
        "gps_seg_requests_total{task=\"a\",code=\"400\"} 1\n",
        "gps_seg_requests_aborted_total{task=\"a\"} 1\n",
    ] {
        assert!(m.contains(line), "{line}: {m}");
    }
    server.shutdown().unwrap();
}

#[test]
fn task_specs_and_configs_are_checked() {
    assert_eq!(
        TaskSpec::parse("polyp=m.onnx").unwrap(),
        TaskSpec {
            name: "polyp".into(),
            model: "m.onnx".into()
        }
    );
    for bad in ["polyp", "=m.onnx", "a b=m.onnx", "a="] {
        assert!(TaskSpec::parse(bad).is_err(), "{bad}");
    }
    let t = TaskSpec::parse("a=missing.onnx").unwrap();
    let e = Server::bind(&config(&[("a", &t.model)]), &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.onnx") && e.contains("task `a`"), "{e}");
    let mut c = config(&[("a", Path::new("x.onnx")), ("a", Path::new("y.onnx"))]);
    assert!(c.validate().unwrap_err().to_string().contains("twice"));
    c.tasks.pop();
    c.sessions = 0;
    assert!(c.validate().is_err());
}

/// The Candle SAM's prompted single-mask output for `image` (file) with `points` / `bbox`
/// (original pixels), upsampled to S, then the same post-processing as `infer`: the
/// reference the served prompted mask is compared with.
fn candle_prompted_mask(
    image: &Path,
    points: &[(f32, f32, f32)],
    bbox: Option<[f32; 4]>,
) -> Vec<u8> {
    use candle_core::{Device, Tensor};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg: SamConfig = gps_seg::util::fs::read_json(&root.join("sam/sam-tiny.json")).unwrap();
    let w =
        gps_seg::util::tensors::load(&root.join("sam/sam-tiny.safetensors"), &Device::Cpu).unwrap();
    let (sam, _) = gps_seg::sam::build(
        &cfg,
        Some(w),
        gps_seg::nn::RolePolicy::AllFrozen,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let s = cfg.image_size;
    let rgb = imgio::decode_rgb(image).unwrap();
    let (h, wd) = (rgb.height() as usize, rgb.width() as usize);
    let (sx, sy) = (s as f32 / wd as f32, s as f32 / h as f32); // squash
    let x = Tensor::from_vec(
        gps_seg::infer::mask::preprocess(&rgb, s, gps_seg::data::resize::Resize::Squash),
        (1, 3, s, s),
        &Device::Cpu,
    )
    .unwrap();
    let emb = sam.image_embeddings(&sam.normalize(&x).unwrap()).unwrap();
    let coords: Vec<f32> = points.iter().flat_map(|p| [p.0 * sx, p.1 * sy]).collect();
    let labels: Vec<f32> = points.iter().map(|p| p.2).collect();
    let pc = Tensor::from_vec(coords, (1, points.len(), 2), &Device::Cpu).unwrap();
    let pl = Tensor::from_vec(labels, (1, points.len()), &Device::Cpu).unwrap();
    let bx = bbox.map(|b| {
        Tensor::from_vec(
            vec![b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy],
            (1, 4),
            &Device::Cpu,
        )
        .unwrap()
    });
    // One point and no box is ambiguous: the multimask output with the best predicted IoU
    // (the convention of training and `infer`), else the single-mask output.
    let ambiguous = points.len() == 1 && bbox.is_none();
    let (low, iou) = sam
        .forward_prompted(
            &emb,
            (!points.is_empty()).then_some((&pc, &pl)),
            bx.as_ref(),
            ambiguous,
        )
        .unwrap();
    let iou: Vec<f32> = iou.flatten_all().unwrap().to_vec1().unwrap();
    let pick = (0..iou.len())
        .max_by(|&a, &b| iou[a].total_cmp(&iou[b]))
        .unwrap();
    let g4 = low.dim(2).unwrap();
    let low: Vec<f32> = low.flatten_all().unwrap().to_vec1().unwrap();
    let up =
        gps_seg::data::resize::bilinear(&low[pick * g4 * g4..(pick + 1) * g4 * g4], g4, g4, s, s);
    let m = gps_seg::infer::mask::postprocess(
        &up,
        s,
        gps_seg::data::resize::Resize::Squash,
        (h, wd),
        0.5,
    )
    .unwrap()
    .unwrap();
    m.pred
}

#[test]
fn a_prompted_pair_serves_point_and_box_prompts_like_the_candle_sam() {
    let f = fixture();
    let server = Server::bind(
        &config(&[("click", &f.prompted), ("polyp", &f.pretrained)]),
        &mut Silent,
    )
    .unwrap();
    let addr = server.addr();
    let t: serde_json::Value = serde_json::from_slice(&get(addr, "/v1/tasks").body).unwrap();
    assert_eq!(t["tasks"][0]["name"], "click");
    assert_eq!(t["tasks"][0]["prompted"], true);
    assert_eq!(t["tasks"][1]["prompted"], false);
    let im = render(3, 0, 200);
    let b = &im.boxes[0];
    let (cx, cy) = ((b.xmin + b.xmax) / 2.0, (b.ymin + b.ymax) / 2.0);
    let png = std::fs::read(&f.png).unwrap();
    type Case = (String, Vec<(f32, f32, f32)>, Option<[f32; 4]>);
    let cases: Vec<Case> = vec![
        (format!("points={cx},{cy},1"), vec![(cx, cy, 1.0)], None),
        (
            format!("points={cx},{cy},1;2,2,0"),
            vec![(cx, cy, 1.0), (2.0, 2.0, 0.0)],
            None,
        ),
        (
            format!("box={},{},{},{}", b.xmin, b.ymin, b.xmax, b.ymax),
            vec![],
            Some([b.xmin, b.ymin, b.xmax, b.ymax]),
        ),
    ];
    let mut areas = Vec::new();
    for (q, points, bbox) in &cases {
        let r = post(addr, &format!("/v1/segment?task=click&{q}"), &[], &png);
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        let served = image::load_from_memory(&r.body).unwrap().to_luma8();
        let want = candle_prompted_mask(&f.png, points, *bbox);
        assert_eq!(served.as_raw().len(), want.len());
        let agree = served
            .as_raw()
            .iter()
            .zip(&want)
            .filter(|(a, w)| (**a == 255) == (**w == 1))
            .count();
        let frac = agree as f64 / want.len() as f64;
        eprintln!("{q}: ORT vs Candle agree on {:.4} of pixels", frac);
        assert!(
            frac >= 0.995,
            "{q}: only {frac:.4} of pixels agree with the Candle SAM"
        );
        areas.push(served.as_raw().iter().filter(|&&v| v == 255).count());
    }
    assert!(areas.iter().any(|&a| a > 0), "{areas:?}");
    // Prompts are checked and required where they belong.
    for (q, code, msg) in [
        ("", 400, "task `click` is prompted"),
        ("&points=9999,1,1", 400, "outside the"),
        ("&points=1,2,7", 400, "label 7"),
        ("&points=1,2", 400, "expected x,y,label"),
        ("&box=5,5,1,1", 400, "x0 < x1"),
        ("&points=nan,1,1", 400, "not a finite number"),
    ] {
        let r = post(addr, &format!("/v1/segment?task=click{q}"), &[], &png);
        assert_eq!(r.status, code, "{q}: {}", r.text());
        assert!(r.text().contains(msg), "{q}: {}", r.text());
    }
    let r = post(addr, "/v1/segment?task=polyp&points=1,1,1", &[], &png);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("prompt-free"), "{}", r.text());
    server.shutdown().unwrap();
}

#[test]
fn the_binary_serves_until_sigterm_and_finishes_the_request_in_flight() {
    use std::io::BufRead;
    let f = fixture();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gps-seg"))
        .args(["serve", "--port", "0", "--threads", "1", "--task"])
        .arg(format!("a={}", f.random.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {line}"))
        .parse()
        .unwrap();
    assert_eq!(
        addr.ip().to_string(),
        "127.0.0.1",
        "bound to localhost by default"
    );
    assert_eq!(get(addr, "/healthz").text(), "ok\n");
    let png = std::fs::read(&f.png).unwrap();
    let inflight = start_upload(addr, "/v1/segment?task=a", &png, 64);
    wait_metric(addr, "gps_seg_queue_depth{task=\"a\"} 1");
    // An idle keep-alive connection and one stopped mid-headers do not hold the shutdown up.
    let mut idle = client::Client::connect(addr, Duration::from_secs(10)).unwrap();
    assert_eq!(idle.send("GET", "/healthz", &[], b"").unwrap().status, 200);
    let mut partial = TcpStream::connect(addr).unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t_term = Instant::now();
    // SAFETY: sends SIGTERM to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = finish_upload(inflight, &png[64..]);
    assert_eq!(code, 200, "{text}");
    let status = child.wait().unwrap();
    // Far below the request timeout + 5 s (35 s) a lingering connection used to cost.
    assert!(
        t_term.elapsed() < Duration::from_secs(10),
        "{:?}",
        t_term.elapsed()
    );
    drop((idle, partial));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.contains("SIGTERM: finishing in-flight requests"),
        "{err}"
    );
}
