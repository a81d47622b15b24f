//! Content hashes of files: SHA-256 read in fixed-size chunks (never the whole file in
//! memory), for checks that must follow a file's bytes rather than its path (shard reports'
//! job identity, classification splits that share an image).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// A file's size in bytes and the SHA-256 of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileHash {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl FileHash {
    /// The digest as lower-case hex.
    pub fn hex(&self) -> String {
        hex(&self.sha256)
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hash the file at `path` in 1 MiB chunks; errors name the file.
pub fn sha256_file(path: &Path) -> Result<FileHash> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        h.update(&buf[..n]);
        bytes = bytes.saturating_add(n as u64);
    }
    Ok(FileHash {
        bytes,
        sha256: h.finalize().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hash_is_sha256_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let h = sha256_file(&p).unwrap();
        assert_eq!(h.bytes, data.len() as u64);
        assert_eq!(h.hex(), format!("{:x}", Sha256::digest(&data)));
        assert!(sha256_file(&dir.path().join("missing")).is_err());
    }
}
