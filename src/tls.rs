//! TLS for the client ports (`tls_cert`, `tls_key`): the certificate and key read from PEM files
//! into a rustls server configuration that a SIGHUP can replace (`TlsSettings`), and one
//! connection's TLS state (`TlsSession`), driven by the sessions on the shard's own sockets:
//! ciphertext read by glommio is fed to rustls, and TLS records go out with the same non-blocking
//! `send`/`sendmsg` as plain frames. No other runtime is involved.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};
use std::cell::RefCell;
use std::io::{self, BufRead, IoSlice, Write};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Bytes of TLS records one connection holds before they reach the socket (rustls's buffer
/// limit): plaintext is handed to rustls only while this is not full, so a connection that does
/// not read keeps at most this much (plus one record) beyond its `max_outbound_queue_bytes`
/// queue of frames.
pub const TLS_BUFFER_LIMIT: usize = 32 * 1024;

/// The certificate chain of a PEM file (for `tls_cert`).
pub fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (for `tls_key`): PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!("{path} holds no private key"),
        e => format!("{path} is not a valid PEM private key: {e}"),
    })
}

/// The server configuration for a certificate chain and its key; an error when the key does
/// not fit the certificate (or is of a kind the crypto provider does not sign with).
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the key does not go with the certificate: {e}"))?;
    // WebSocket and the HTTP API are HTTP/1.1; a client that offers only h2 is refused in the
    // handshake rather than misunderstood after it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `tls_cert` and `tls_key` as a server configuration. Errors name the file.
pub fn load(cert: &str, key: &str) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(cert)?;
    let private = read_key(key)?;
    server_config(certs, private).map_err(|e| format!("{key} and {cert}: {e}"))
}

/// The certificate the server presents, replaceable while it runs: each new handshake takes the
/// configuration current at its start; connections keep the one they began with.
pub struct TlsSettings {
    cert: String,
    key: String,
    current: Mutex<Arc<ServerConfig>>,
}

impl TlsSettings {
    /// Reads `cert` and `key` (PEM files).
    pub fn load(cert: &str, key: &str) -> Result<TlsSettings, String> {
        Ok(TlsSettings {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Mutex::new(load(cert, key)?),
        })
    }

    /// Reads the files again; on an error the certificate in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = load(&self.cert, &self.key)?;
        match self.current.lock() {
            Ok(mut current) => *current = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// The certificate file, for messages.
    pub fn cert_path(&self) -> &str {
        &self.cert
    }

    /// The state of a new connection's TLS, with the current certificate.
    pub fn session(&self) -> Result<Box<TlsSession>, rustls::Error> {
        let config = match self.current.lock() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsSession::new(config)
    }
}

/// What feeding received bytes to a TLS connection came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// Still open (plaintext, if any, was handed on).
    Open,
    /// The peer sent `close_notify`: no more input.
    Closed,
}

/// One connection's TLS. Used on its shard only; each method borrows the state for its own
/// duration (never across an `.await`).
pub struct TlsSession {
    conn: RefCell<ServerConnection>,
}

impl TlsSession {
    /// A server-side TLS connection awaiting the client's hello.
    pub fn new(config: Arc<ServerConfig>) -> Result<Box<TlsSession>, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Ok(Box::new(TlsSession {
            conn: RefCell::new(conn),
        }))
    }

    /// The handshake has not completed.
    pub fn is_handshaking(&self) -> bool {
        self.conn.borrow().is_handshaking()
    }

    /// TLS records are waiting to be written to the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.borrow().wants_write()
    }

    /// Feeds bytes read from the socket; each piece of plaintext they hold goes to `plain`, in
    /// order. An error is a TLS failure (rustls then has an alert waiting to be written): the
    /// connection is over.
    pub fn feed(&self, mut input: &[u8], mut plain: impl FnMut(&[u8])) -> io::Result<Fed> {
        let mut conn = self.conn.borrow_mut();
        while !input.is_empty() {
            // Takes at most what rustls has room for (a record and a bit; more while a large
            // handshake message is being joined, at most 64 KiB).
            if conn.read_tls(&mut input)? == 0 {
                return Ok(Fed::Closed);
            }
            let state = conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // Everything decrypted is handed on at once: rustls refuses to read more while its
            // plaintext buffer is full, and none is left behind between calls.
            let mut reader = conn.reader();
            loop {
                match reader.fill_buf() {
                    Ok([]) => return Ok(Fed::Closed),
                    Ok(chunk) => {
                        let n = chunk.len();
                        plain(chunk);
                        reader.consume(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if state.peer_has_closed() {
                return Ok(Fed::Closed);
            }
        }
        Ok(Fed::Open)
    }

    /// Encrypts as much of `bufs` (taken in order) as the buffer limit lets in; the bytes taken.
    pub fn encrypt(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.conn.borrow_mut().writer().write_vectored(bufs)
    }

    /// Writes waiting TLS records to `out` until none is left (`Ok(true)`) or `out` would block
    /// (`Ok(false)`). Written bytes leave rustls's buffer, the rest stays for the next call: no
    /// byte is lost or written twice. (The writers here count what they wrote.)
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<bool> {
        let mut conn = self.conn.borrow_mut();
        while conn.wants_write() {
            match conn.write_tls(out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Queues `close_notify` and writes what is waiting without blocking (an alert after a
    /// failure, the end of a connection); whatever does not fit is dropped with the socket.
    pub fn close(&self, fd: RawFd) {
        self.conn.borrow_mut().send_close_notify();
        let _ = self.write_to(&mut FdWriter::new(fd));
    }

    /// Writes a failure's alert (already queued by rustls) without blocking, if the socket
    /// takes it.
    pub fn send_alert(&self, fd: RawFd) {
        let _ = self.write_to(&mut FdWriter::new(fd));
    }
}

/// Non-blocking writes to a socket descriptor: `send`, or `sendmsg` for several slices (one
/// syscall for several TLS records). `WouldBlock` when the socket is full.
pub struct FdWriter {
    fd: RawFd,
    /// Bytes written so far.
    pub written: usize,
}

impl FdWriter {
    /// A writer to `fd`.
    pub fn new(fd: RawFd) -> FdWriter {
        FdWriter { fd, written: 0 }
    }
}

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        const MAX_IOV: usize = 64;
        let count = bufs.len().min(MAX_IOV);
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; the slices outlive the call
        // and the kernel only reads them.
        let written = unsafe {
            if count == 1 {
                libc::send(self.fd, bufs[0].as_ptr().cast(), bufs[0].len(), flags)
            } else {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = count;
                libc::sendmsg(self.fd, &msg, flags)
            }
        };
        if written < 0 {
            return Err(io::Error::last_os_error());
        }
        self.written += written as usize;
        Ok(written as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes through an async stream's `poll_write` from inside a poll: a write the socket cannot
/// take yet is `WouldBlock`, and the stream has then registered the task's waker for when it
/// can (what a task waits on when its socket is full).
pub struct PollWriter<'a, 'b, S> {
    /// The stream written to.
    pub stream: &'a mut S,
    /// The polling task's context.
    pub cx: &'a mut Context<'b>,
    /// Bytes written so far.
    pub written: usize,
}

impl<S: futures_lite::io::AsyncWrite + Unpin> Write for PollWriter<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::pin::Pin::new(&mut *self.stream).poll_write(self.cx, buf) {
            Poll::Ready(Ok(n)) => {
                self.written += n;
                Ok(n)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_broken_files_are_named() {
        let dir = std::env::temp_dir().join(format!("shardpush-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = read_certs(missing.to_str().unwrap()).unwrap_err();
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let e = read_certs(empty.to_str().unwrap()).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let e = read_key(empty.to_str().unwrap()).unwrap_err();
        assert!(e.contains("holds no private key"), "{e}");
        let bad = dir.join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_certs(bad.to_str().unwrap()).unwrap_err();
        assert!(e.contains("not valid PEM"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
