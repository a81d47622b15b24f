//! Small pieces of the HTTP wire format the server needs and no dependency gives it here:
//! query-string parsing, a `multipart/form-data` reader for one file field, and base64.

/// Largest number of query parameters accepted.
pub const MAX_QUERY_PARAMS: usize = 16;
/// Largest number of parts read from a multipart body.
pub const MAX_PARTS: usize = 64;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` decoding of one component (`+` is a space).
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(format!("bad percent escape in `{s}`"));
                };
                out.push(h << 4 | l);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

/// `a=1&b=2` → pairs in order; refuses more than [`MAX_QUERY_PARAMS`], repeated keys and
/// undecodable escapes, naming them.
pub fn parse_query(q: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let Some(q) = q else { return Ok(out) };
    for kv in q.split('&').filter(|s| !s.is_empty()) {
        if out.len() == MAX_QUERY_PARAMS {
            return Err(format!("more than {MAX_QUERY_PARAMS} query parameters"));
        }
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        if out.iter().any(|(o, _)| *o == k) {
            return Err(format!("query parameter `{k}` given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 200)
    })
}

/// One part of a multipart body.
#[derive(Debug)]
pub struct Part<'a> {
    /// The `name` of its `Content-Disposition` (empty when none).
    pub name: String,
    pub filename: Option<String>,
    pub body: &'a [u8],
}

fn disposition_param(headers: &str, key: &str) -> Option<String> {
    let line = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))?;
    line.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// The parts of a `multipart/form-data` body (RFC 7578), at most [`MAX_PARTS`].
pub fn multipart_parts<'a>(boundary: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, String> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut pos = find(body, delim, 0)
        .ok_or_else(|| format!("multipart body has no boundary `{boundary}`"))?;
    let mut parts = Vec::new();
    loop {
        pos += delim.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            return Ok(parts);
        }
        if parts.len() == MAX_PARTS {
            return Err(format!("multipart body has more than {MAX_PARTS} parts"));
        }
        if body.get(pos..pos + 2) != Some(b"\r\n") {
            return Err("multipart boundary not followed by CRLF".into());
        }
        pos += 2;
        let hend = find(body, b"\r\n\r\n", pos)
            .ok_or_else(|| "multipart part without a blank line after its headers".to_string())?;
        let headers = std::str::from_utf8(body.get(pos..hend).unwrap_or_default())
            .map_err(|_| "multipart part headers are not UTF-8".to_string())?;
        let start = hend + 4;
        let mut next_delim = b"\r\n".to_vec();
        next_delim.extend_from_slice(delim);
        let end = find(body, &next_delim, start).ok_or_else(|| {
            "multipart part is not closed by its boundary (truncated?)".to_string()
        })?;
        parts.push(Part {
            name: disposition_param(headers, "name").unwrap_or_default(),
            filename: disposition_param(headers, "filename"),
            body: body.get(start..end).unwrap_or_default(),
        });
        pos = end + 2;
    }
}

/// The image of a multipart body: the field `file` (or `image`), else the only part with a
/// file name.
pub fn multipart_image<'a>(content_type: &str, body: &'a [u8]) -> Result<&'a [u8], String> {
    let b = boundary(content_type)
        .ok_or_else(|| "multipart/form-data without a boundary parameter".to_string())?;
    let parts = multipart_parts(&b, body)?;
    if let Some(p) = parts.iter().find(|p| p.name == "file" || p.name == "image") {
        return Ok(p.body);
    }
    let files: Vec<&Part> = parts.iter().filter(|p| p.filename.is_some()).collect();
    match files.as_slice() {
        [one] => Ok(one.body),
        _ => Err(format!(
            "multipart body has no field `file` (fields: {})",
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts
                    .iter()
                    .map(|p| format!("`{}`", p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )),
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [
            c[0],
            c.get(1).copied().unwrap_or(0),
            c.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(B64[(n >> shift & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn query_and_multipart() {
        let q = parse_query(Some("task=a%20b&format=json&x")).unwrap();
        assert_eq!(q[0], ("task".into(), "a b".into()));
        assert_eq!(q[2], ("x".into(), "".into()));
        assert!(parse_query(Some("a=1&a=2")).is_err());
        assert!(parse_query(Some("a=%zz")).is_err());
        let ct = "multipart/form-data; boundary=\"XyZ\"";
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--X\r\n--XyZ--\r\n";
        assert_eq!(multipart_image(ct, body).unwrap(), b"\x89PNG\r\n--X");
        assert!(multipart_image(ct, &body[..60]).is_err());
        assert!(multipart_image("multipart/form-data", body).is_err());
        let e = multipart_image(
            ct,
            b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--XyZ--",
        )
        .unwrap_err();
        assert!(e.contains("`a`"), "{e}");
    }
}
