//! The synthetic "segment anything" upstream task used to pretrain the project's small SAM.
//!
//! Scenes of 3–9 objects (ellipses, polygons, stars, smooth blobs, rings) with their own
//! textures (flat, stripes, checks, noise, gradients) over a textured background, drawn in
//! depth order so objects occlude each other. Each scene carries every object's visible mask
//! (for point and box prompts) and a prompt-free target: the union of all objects against the
//! background ("segment the foreground"), which trains `no_mask_embed`.
//!
//! Deliberately unlike polyps (no mucosa colours, no soft domes), so fine-tuning on Kvasir is a
//! real transfer. Deterministic per (seed, index); generated in memory, never written to disk.

use crate::util::Rng;

/// One scene: image `[3, s, s]` RGB in [0,1] (CHW), visible masks per object (`[s*s]` {0,1}),
/// and the foreground union.
#[derive(Debug, Clone)]
pub struct Scene {
    pub size: usize,
    pub image: Vec<f32>,
    pub objects: Vec<Vec<u8>>,
    pub foreground: Vec<u8>,
}

impl Scene {
    /// Bounding box `[x0, y0, x1, y1]` (pixels, inclusive-exclusive) of object `i`, if visible.
    pub fn bbox(&self, i: usize) -> Option<[f32; 4]> {
        let s = self.size;
        let m = self.objects.get(i)?;
        let (mut x0, mut y0, mut x1, mut y1) = (s, s, 0, 0);
        for y in 0..s {
            for x in 0..s {
                if m[y * s + x] != 0 {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x + 1);
                    y1 = y1.max(y + 1);
                }
            }
        }
        (x1 > x0).then_some([x0 as f32, y0 as f32, x1 as f32, y1 as f32])
    }

    /// A random pixel `(x, y)` inside object `i`, if visible.
    pub fn point_in(&self, i: usize, rng: &mut Rng) -> Option<(f32, f32)> {
        let m = self.objects.get(i)?;
        let n = m.iter().filter(|&&v| v != 0).count();
        if n == 0 {
            return None;
        }
        let k = rng.below(n);
        let idx = m.iter().enumerate().filter(|(_, &v)| v != 0).nth(k)?.0;
        Some((
            (idx % self.size) as f32 + 0.5,
            (idx / self.size) as f32 + 0.5,
        ))
    }
}

#[derive(Clone, Copy)]
enum Texture {
    Flat,
    Stripes { freq: f32, angle: f32 },
    Checks { period: f32 },
    Noise { scale: f32 },
    Gradient { angle: f32 },
}

fn random_texture(rng: &mut Rng) -> Texture {
    match rng.below(5) {
        0 => Texture::Flat,
        1 => Texture::Stripes {
            freq: rng.uniform(0.05, 0.35),
            angle: rng.uniform(0.0, std::f32::consts::PI),
        },
        2 => Texture::Checks {
            period: rng.uniform(4.0, 20.0),
        },
        3 => Texture::Noise {
            scale: rng.uniform(0.15, 0.5),
        },
        _ => Texture::Gradient {
            angle: rng.uniform(0.0, std::f32::consts::TAU),
        },
    }
}

fn hash2(x: i32, y: i32, seed: u32) -> f32 {
    let mut h = (x as u32).wrapping_mul(0x27d4_eb2d) ^ (y as u32).wrapping_mul(0x1656_67b1) ^ seed;
    h ^= h >> 15;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    (h & 0xffff) as f32 / 65535.0
}

/// Value noise in [0,1] at (x, y) with cell size `cell`.
fn value_noise(x: f32, y: f32, cell: f32, seed: u32) -> f32 {
    let (fx, fy) = (x / cell, y / cell);
    let (ix, iy) = (fx.floor() as i32, fy.floor() as i32);
    let (tx, ty) = (fx - ix as f32, fy - iy as f32);
    let s = |t: f32| t * t * (3.0 - 2.0 * t);
    let (sx, sy) = (s(tx), s(ty));
    let a = hash2(ix, iy, seed);
    let b = hash2(ix + 1, iy, seed);
    let c = hash2(ix, iy + 1, seed);
    let d = hash2(ix + 1, iy + 1, seed);
    let top = a + (b - a) * sx;
    let bot = c + (d - c) * sx;
    top + (bot - top) * sy
}

fn shade(tex: Texture, c1: [f32; 3], c2: [f32; 3], x: f32, y: f32, seed: u32) -> [f32; 3] {
    let t = match tex {
        Texture::Flat => 0.0,
        Texture::Stripes { freq, angle } => {
            let u = x * angle.cos() + y * angle.sin();
            0.5 + 0.5 * (u * freq).sin()
        }
        Texture::Checks { period } => {
            (((x / period).floor() as i32 + (y / period).floor() as i32) & 1) as f32
        }
        Texture::Noise { scale } => value_noise(x, y, 6.0 / scale, seed),
        Texture::Gradient { angle } => {
            let u = x * angle.cos() + y * angle.sin();
            (0.5 + u / 400.0).clamp(0.0, 1.0)
        }
    };
    [
        c1[0] + (c2[0] - c1[0]) * t,
        c1[1] + (c2[1] - c1[1]) * t,
        c1[2] + (c2[2] - c1[2]) * t,
    ]
}

fn random_colour(rng: &mut Rng) -> [f32; 3] {
    [rng.f32(), rng.f32(), rng.f32()]
}

/// Shape as a signed inside test in the object's frame: polar radius function r(θ).
struct Shape {
    cx: f32,
    cy: f32,
    radius: f32,
    aspect: f32,
    rot: f32,
    harmonics: Vec<(f32, f32, f32)>, // (k, amplitude, phase)
    ring: Option<f32>,
    polygon: Option<usize>,
}

impl Shape {
    fn random(s: f32, rng: &mut Rng) -> Self {
        let radius = s * rng.uniform(0.06, 0.28);
        let kind = rng.below(5);
        let mut harmonics = Vec::new();
        let mut polygon = None;
        let mut ring = None;
        match kind {
            0 => {}
            1 => polygon = Some(3 + rng.below(4)),
            2 => harmonics.push((
                5.0 + rng.below(3) as f32,
                rng.uniform(0.25, 0.45),
                rng.f32() * 6.3,
            )),
            3 => {
                for k in 2..6 {
                    harmonics.push((k as f32, rng.uniform(0.0, 0.18), rng.f32() * 6.3));
                }
            }
            _ => ring = Some(rng.uniform(0.35, 0.65)),
        }
        Shape {
            cx: rng.uniform(-0.05, 1.05) * s,
            cy: rng.uniform(-0.05, 1.05) * s,
            radius,
            aspect: rng.uniform(0.5, 1.0),
            rot: rng.uniform(0.0, std::f32::consts::PI),
            harmonics,
            ring,
            polygon,
        }
    }

    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (c, s) = (self.rot.cos(), self.rot.sin());
        let u = dx * c + dy * s;
        let v = (-dx * s + dy * c) / self.aspect;
        let r = (u * u + v * v).sqrt();
        let th = v.atan2(u);
        let mut rad = self.radius;
        if let Some(n) = self.polygon {
            let sector = std::f32::consts::TAU / n as f32;
            let a = (th.rem_euclid(sector)) - sector / 2.0;
            rad *= (sector / 2.0).cos() / a.cos();
        }
        for &(k, amp, ph) in &self.harmonics {
            rad *= 1.0 + amp * (k * th + ph).sin();
        }
        if let Some(inner) = self.ring {
            return r <= rad && r >= rad * inner;
        }
        r <= rad
    }
}

/// Generate scene `index` of the stream `seed` at `size × size`.
pub fn scene(seed: u64, index: u64, size: usize) -> Scene {
    let mut rng = Rng::derive(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15), "scene");
    let s = size as f32;
    let n = size * size;
    let mut image = vec![0f32; 3 * n];
    // Background.
    let bg_tex = random_texture(&mut rng);
    let (b1, b2) = (random_colour(&mut rng), random_colour(&mut rng));
    let bg_seed = rng.next_u64() as u32;
    for y in 0..size {
        for x in 0..size {
            let c = shade(bg_tex, b1, b2, x as f32, y as f32, bg_seed);
            for k in 0..3 {
                image[k * n + y * size + x] = c[k];
            }
        }
    }
    let count = 3 + rng.below(7);
    let mut owner = vec![u8::MAX; n];
    for obj in 0..count {
        let shape = Shape::random(s, &mut rng);
        let tex = random_texture(&mut rng);
        let (c1, c2) = (random_colour(&mut rng), random_colour(&mut rng));
        let oseed = rng.next_u64() as u32;
        let shading = rng.uniform(0.0, 0.35);
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                if !shape.contains(fx, fy) {
                    continue;
                }
                let mut c = shade(tex, c1, c2, fx, fy, oseed);
                let d = ((fx - shape.cx).powi(2) + (fy - shape.cy).powi(2)).sqrt() / shape.radius;
                let light = 1.0 - shading * d.min(1.5);
                for v in c.iter_mut() {
                    *v = (*v * light).clamp(0.0, 1.0);
                }
                let i = y * size + x;
                for k in 0..3 {
                    image[k * n + i] = c[k];
                }
                owner[i] = obj as u8;
            }
        }
    }
    // Sensor noise and mild global brightness change.
    let gain = rng.uniform(0.8, 1.15);
    for v in image.iter_mut() {
        *v = (*v * gain + rng.normal() * 0.02).clamp(0.0, 1.0);
    }
    let mut objects: Vec<Vec<u8>> = (0..count)
        .map(|o| owner.iter().map(|&w| (w == o as u8) as u8).collect())
        .collect();
    // Drop objects that are (almost) fully hidden.
    objects.retain(|m| m.iter().filter(|&&v| v != 0).count() >= 12);
    let foreground = owner.iter().map(|&w| (w != u8::MAX) as u8).collect();
    Scene {
        size,
        image,
        objects,
        foreground,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_masks_consistent() {
        let a = scene(1, 7, 64);
        let b = scene(1, 7, 64);
        assert_eq!(a.image, b.image);
        assert_ne!(scene(1, 8, 64).image, a.image);
        assert!(!a.objects.is_empty());
        // Visible masks are disjoint and their union is the foreground.
        let n = 64 * 64;
        for i in 0..n {
            let owners: u8 = a.objects.iter().map(|m| m[i]).sum();
            assert!(owners <= 1);
            if owners == 1 {
                assert_eq!(a.foreground[i], 1);
            }
        }
        let mut rng = Rng::new(0);
        let p = a.point_in(0, &mut rng).unwrap();
        let (x, y) = (p.0 as usize, p.1 as usize);
        assert_eq!(a.objects[0][y * 64 + x], 1);
        let bb = a.bbox(0).unwrap();
        assert!(bb[0] <= p.0 && p.0 <= bb[2] && bb[1] <= p.1 && p.1 <= bb[3]);
        assert!(a.image.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
