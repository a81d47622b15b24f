//! A minimal blocking HTTP/1.1 client over `std::net::TcpStream`, enough for the load
//! benchmark and the tests: one keep-alive connection (opened again after a response with
//! `Connection: close`), `Content-Length` or chunked responses, header and body sizes bounded.

use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest response head (status line + headers) read.
const MAX_HEAD: usize = 64 << 10;
/// Largest response body read.
const MAX_BODY: usize = 256 << 20;

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let n = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One connection to a server.
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    reader: BufReader<TcpStream>,
    /// The server said `Connection: close`: the next request opens a new connection.
    closed: bool,
}

fn io(addr: SocketAddr, what: &str, e: std::io::Error) -> Error {
    Error::msg(format!("http://{addr}: {what}: {e}"))
}

impl Client {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client> {
        Ok(Client {
            addr,
            timeout,
            reader: BufReader::new(Self::open(addr, timeout)?),
            closed: false,
        })
    }

    fn open(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| io(addr, "connect", e))?;
        s.set_read_timeout(Some(timeout))
            .and_then(|_| s.set_write_timeout(Some(timeout)))
            .and_then(|_| s.set_nodelay(true))
            .map_err(|e| io(addr, "socket options", e))?;
        Ok(s)
    }

    /// Send one request and read its response (the connection stays open).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let addr = self.addr;
        if self.closed {
            self.reader = BufReader::new(Self::open(addr, self.timeout)?);
            self.closed = false;
        }
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let s = self.reader.get_mut();
        let sent = s
            .write_all(head.as_bytes())
            .and_then(|_| s.write_all(body))
            .and_then(|_| s.flush());
        match sent {
            Ok(()) => self.read_response(),
            // A server may answer (413, 503) and close before the whole body is sent: read
            // that answer if there is one.
            Err(e) => self.read_response().map_err(|_| io(addr, "send", e)),
        }
    }

    fn line(&mut self, budget: &mut usize) -> Result<String> {
        let addr = self.addr;
        let mut l = String::new();
        let n = (&mut self.reader)
            .take(*budget as u64)
            .read_line(&mut l)
            .map_err(|e| io(addr, "read", e))?;
        if n == 0 {
            return Err(Error::msg(format!(
                "http://{addr}: connection closed before the response was complete"
            )));
        }
        *budget = budget.saturating_sub(n);
        if !l.ends_with('\n') {
            return Err(Error::msg(format!("http://{addr}: response head too long")));
        }
        Ok(l.trim_end_matches(['\r', '\n']).to_string())
    }

    fn read_response(&mut self) -> Result<Response> {
        let addr = self.addr;
        let mut budget = MAX_HEAD;
        let status_line = self.line(&mut budget)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| Error::msg(format!("http://{addr}: bad status line `{status_line}`")))?;
        let mut headers = Vec::new();
        loop {
            let l = self.line(&mut budget)?;
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let mut r = Response {
            status,
            headers,
            body: Vec::new(),
        };
        self.closed = r
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let chunked = r
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let l = self.line(&mut budget)?;
                let n = usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| Error::msg(format!("http://{addr}: bad chunk size `{l}`")))?;
                if n == 0 {
                    let _ = self.line(&mut budget)?;
                    break;
                }
                if r.body.len().saturating_add(n) > MAX_BODY {
                    return Err(Error::msg(format!(
                        "http://{addr}: response body too large"
                    )));
                }
                let start = r.body.len();
                r.body.resize(start + n, 0);
                self.reader
                    .read_exact(&mut r.body[start..])
                    .map_err(|e| io(addr, "read", e))?;
                let _ = self.line(&mut budget)?;
            }
        } else if let Some(len) = r.header("content-length") {
            let n: usize = len
                .parse()
                .map_err(|_| Error::msg(format!("http://{addr}: bad Content-Length `{len}`")))?;
            if n > MAX_BODY {
                return Err(Error::msg(format!(
                    "http://{addr}: response body too large"
                )));
            }
            r.body.resize(n, 0);
            self.reader
                .read_exact(&mut r.body)
                .map_err(|e| io(addr, "read", e))?;
        } else {
            (&mut self.reader)
                .take(MAX_BODY as u64)
                .read_to_end(&mut r.body)
                .map_err(|e| io(addr, "read", e))?;
        }
        Ok(r)
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let mut c = Client::connect(addr, Duration::from_secs(60))?;
    c.send(method, path, headers, body)
}
