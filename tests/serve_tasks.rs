//! Many tasks on one base in `gps-seg serve` (issue #28): task files served on their base held
//! once answer the merged models' masks byte for byte, interleaved and concurrent requests of
//! several tasks each get their own task's mask, `--tasks-dir` loads tasks on first use and
//! unloads the least recently used beyond `--max-loaded`, `PUT` / `DELETE /v1/tasks/NAME` add
//! and remove tasks without a restart, a task of another base is answered 409 naming both
//! content hashes. Servers run in-process on ephemeral 127.0.0.1 ports; every client is bounded.

mod common;

use common::infer_mask;
use gps_seg::bench::tasks::synthetic_task;
use gps_seg::data::imgio;
use gps_seg::data::synth_kvasir::render;
use gps_seg::onnx::delta::{export_sam_task, SamGraph};
use gps_seg::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use gps_seg::progress::Silent;
use gps_seg::sam::SamConfig;
use gps_seg::serve::client::{self, Response};
use gps_seg::serve::{ServeConfig, Server, TaskInfo, TaskSpec};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const TASKS: u64 = 4;

/// A base (random tiny SAM at 64 px) with `TASKS` task files in `dir/tasks`, their merged
/// models in `dir/merged`, a task of another base in `dir/foreign`, and two test images.
struct Fixture {
    dir: tempfile::TempDir,
    images: Vec<PathBuf>,
}

impl Fixture {
    fn tasks(&self) -> PathBuf {
        self.dir.path().join("tasks")
    }
    fn task(&self, i: u64) -> PathBuf {
        self.tasks().join(format!("t{i}.onnx"))
    }
    fn merged(&self, i: u64) -> PathBuf {
        self.dir.path().join(format!("merged/t{i}.onnx"))
    }
    fn foreign(&self) -> PathBuf {
        self.dir.path().join("foreign/f.onnx")
    }
}

fn fixture() -> Fixture {
    common::ort_ready();
    let dir = tempfile::tempdir().unwrap();
    let cfg = SamConfig::tiny().with_image_size(64);
    let opts = SamExportOptions::default();
    let base = random_sam_weights(&cfg, 31).unwrap();
    for sub in ["tasks", "merged", "foreign", "images"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    let f = Fixture {
        dir,
        images: Vec::new(),
    };
    for i in 0..TASKS {
        let art = synthetic_task(&base, 100 + i).unwrap();
        export_sam_task(
            SamGraph::PromptFree,
            &cfg,
            &base,
            &art,
            opts,
            &f.tasks().join("base.onnx"),
            &f.task(i),
        )
        .unwrap();
        let merged = gps_seg::gps::merge(&base, &art).unwrap();
        gps_seg::onnx::write_model(
            &f.merged(i),
            export_prompt_free(&cfg, &merged, opts).unwrap().0,
        )
        .unwrap();
    }
    let other = random_sam_weights(&cfg, 32).unwrap();
    let art = synthetic_task(&other, 9).unwrap();
    let fdir = f.dir.path().join("foreign");
    export_sam_task(
        SamGraph::PromptFree,
        &cfg,
        &other,
        &art,
        opts,
        &fdir.join("base.onnx"),
        &f.foreign(),
    )
    .unwrap();
    let mut images = Vec::new();
    for (k, size) in [(0usize, 150usize), (1, 97)] {
        let p = f.dir.path().join(format!("images/i{k}.png"));
        imgio::write_png(&p, &render(5, k, size).image).unwrap();
        images.push(p);
    }
    Fixture { images, ..f }
}

/// reference[task][image]: the merged models' masks.
fn references(f: &Fixture) -> Vec<Vec<Vec<u8>>> {
    (0..TASKS)
        .map(|i| {
            f.images
                .iter()
                .enumerate()
                .map(|(k, img)| {
                    infer_mask(
                        &f.merged(i),
                        img,
                        &f.dir.path().join(format!("ref/{i}-{k}")),
                    )
                })
                .collect()
        })
        .collect()
}

fn segment(addr: SocketAddr, task: &str, img: &Path) -> Response {
    let body = std::fs::read(img).unwrap();
    client::request(
        addr,
        "POST",
        &format!("/v1/segment?task={task}"),
        &[("Content-Type", "image/png")],
        &body,
    )
    .unwrap()
}

fn tasks(addr: SocketAddr) -> Vec<TaskInfo> {
    let r = client::request(addr, "GET", "/v1/tasks", &[], &[]).unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    serde_json::from_value(v["tasks"].clone()).unwrap()
}

fn config(f: &Fixture, max_loaded: usize) -> ServeConfig {
    let mut c = ServeConfig::new(Vec::new());
    c.tasks_dir = Some(f.tasks());
    c.max_loaded = max_loaded;
    c.port = 0;
    c.threads = 1;
    c
}

/// Task files on one base equal their merged models byte for byte, one base in memory, each
/// request with its own task's weights under interleaved and concurrent load.
#[test]
fn tasks_on_one_base_answer_their_merged_models_masks_interleaved_and_concurrent() {
    let f = fixture();
    let want = references(&f);
    let specs: Vec<TaskSpec> = (0..TASKS)
        .map(|i| TaskSpec {
            name: format!("t{i}"),
            model: f.task(i),
        })
        .collect();
    let mut cfg = ServeConfig::new(specs);
    cfg.port = 0;
    cfg.threads = 1;
    cfg.queue = 64;
    let server = Server::bind(&cfg, &mut Silent).unwrap();
    let addr = server.addr();
    let infos = server.tasks();
    assert_eq!(infos.len(), TASKS as usize);
    let base = infos[0].base_file.clone().expect("served on a shared base");
    for t in &infos {
        assert!(t.loaded);
        assert_eq!(t.base_file.as_deref(), Some(base.as_str()), "one base");
        // A task holds about its file's bytes, never a model's.
        assert!(t.task_bytes.unwrap() as u64 <= 2 * t.file_bytes, "{t:?}");
    }
    // Interleaved, one client: every switch between tasks is exact.
    for round in 0..2 {
        for i in 0..TASKS {
            for (k, img) in f.images.iter().enumerate() {
                let r = segment(addr, &format!("t{i}"), img);
                assert_eq!(r.status, 200, "{}", r.text());
                assert!(
                    r.body == want[i as usize][k],
                    "round {round}: task t{i} image {k}: not the merged model's mask"
                );
            }
        }
    }
    // Concurrent clients, each on its own task: batching never mixes tasks up.
    std::thread::scope(|s| {
        for c in 0..6u64 {
            let (f, want) = (&f, &want);
            s.spawn(move || {
                for j in 0..6u64 {
                    let i = (c + j) % TASKS;
                    let k = ((c + j) % 2) as usize;
                    let r = segment(addr, &format!("t{i}"), &f.images[k]);
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert!(r.body == want[i as usize][k], "client {c}: t{i} image {k}");
                }
            });
        }
    });
    server.shutdown().unwrap();
}

/// `--tasks-dir`: loaded on first use, at most `--max-loaded` at once under a burst over every
/// task; PUT (a body, a path) and DELETE without a restart; 409 for another base's task.
#[test]
fn the_registry_loads_evicts_adds_and_removes_tasks() {
    let f = fixture();
    let want = references(&f);
    // t3 is added at run time.
    let held = f.dir.path().join("held.onnx");
    std::fs::rename(f.task(3), &held).unwrap();
    let server = Server::bind(&config(&f, 2), &mut Silent).unwrap();
    let addr = server.addr();
    let list = tasks(addr);
    assert_eq!(list.len(), 3);
    assert!(list.iter().all(|t| !t.loaded), "loaded on first use only");
    // A burst over more tasks than --max-loaded keeps serving, never more than 2 loaded.
    let mut peak = 0u64;
    for round in 0..4 {
        for i in 0..3u64 {
            let r = segment(addr, &format!("t{i}"), &f.images[0]);
            assert_eq!(r.status, 200, "round {round} t{i}: {}", r.text());
            assert!(r.body == want[i as usize][0], "round {round} t{i}");
            let loaded = tasks(addr).iter().filter(|t| t.loaded).count();
            assert!(loaded <= 2, "{loaded} loaded");
        }
        let rss = gps_seg::util::mem::current_rss_mb().unwrap_or(0.0) as u64;
        if round == 1 {
            peak = rss;
        }
        if round == 3 {
            // Bounded: the later rounds hold no more than the first full round (+ 32 MB slack
            // for allocator noise).
            assert!(rss <= peak + 32, "RSS grew from {peak} to {rss} MB");
        }
    }
    let hits: u64 = tasks(addr).iter().map(|t| t.hits).sum();
    assert_eq!(hits, 12);

    // PUT a task file as the body.
    let body = std::fs::read(&held).unwrap();
    let r = client::request(addr, "PUT", "/v1/tasks/t3", &[], &body).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(f.tasks().join("t3.onnx").is_file());
    let r = segment(addr, "t3", &f.images[1]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == want[3][1], "t3 after PUT");
    // PUT a path already in --tasks-dir under another name.
    let r = client::request(
        addr,
        "PUT",
        "/v1/tasks/again",
        &[("Content-Type", "application/json")],
        br#"{"path": "t0.onnx"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = segment(addr, "again", &f.images[1]);
    assert!(r.body == want[0][1], "`again` is t0");
    // A path outside --tasks-dir is refused.
    let r = client::request(
        addr,
        "PUT",
        "/v1/tasks/x",
        &[("Content-Type", "application/json")],
        br#"{"path": "../held.onnx"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());

    // Another base's task: 409 naming both content hashes; nothing stored.
    let foreign = std::fs::read(f.foreign()).unwrap();
    let r = client::request(addr, "PUT", "/v1/tasks/foreign", &[], &foreign).unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    let text = r.text();
    let hash = |p: &Path| {
        gps_seg::onnx::integrity::read_metadata(p).unwrap()["gps_seg.base_content_hash"].clone()
    };
    assert!(
        text.contains(&hash(&f.foreign())) && text.contains(&hash(&f.task(0))),
        "{text}"
    );
    assert!(!f.tasks().join("foreign.onnx").exists());
    let r = segment(addr, "foreign", &f.images[0]);
    assert_eq!(r.status, 404);

    // DELETE: the task is gone; the file this server wrote is removed, the others kept.
    let r = client::request(addr, "DELETE", "/v1/tasks/t3", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!f.tasks().join("t3.onnx").exists());
    assert_eq!(segment(addr, "t3", &f.images[0]).status, 404);
    let r = client::request(addr, "DELETE", "/v1/tasks/again", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        f.task(0).is_file(),
        "a file the server did not write is kept"
    );
    assert_eq!(
        client::request(addr, "DELETE", "/v1/tasks/nope", &[], &[])
            .unwrap()
            .status,
        404
    );
    let r = segment(addr, "t0", &f.images[0]);
    assert!(r.body == want[0][0]);
    server.shutdown().unwrap();
}
