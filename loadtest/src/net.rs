//! One thread, one epoll, many non-blocking sockets: WebSocket clients (the subscribers) and
//! keep-alive HTTP clients (the publisher). Reads go into one shared buffer; a socket keeps bytes
//! only for an incomplete frame, so 19,000 idle clients cost little. Nothing is allocated per
//! received message.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer. CLOCK_MONOTONIC is shared by all processes, so child
    // processes' receive times compare with the parent's send times.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sockets per source address: below the 28,232 ephemeral ports each address has.
const PER_SOURCE: usize = 20_000;

/// The source address of the `n`-th client socket of a process whose first address is
/// 127.0.0.`first` (127.0.0.1 is left to the server and the publisher).
pub fn source_addr(first: u32, n: usize) -> Ipv4Addr {
    let index = first + (n / PER_SOURCE) as u32;
    Ipv4Addr::new(127, 0, (index >> 8) as u8, (index & 0xff) as u8)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Starts a non-blocking connect from `source` (port chosen at connect time, so one address
/// serves its whole port range).
fn connect_from(source: Ipv4Addr, target: SocketAddrV4) -> io::Result<RawFd> {
    // SAFETY: plain socket syscalls on a descriptor this function owns until it returns it.
    unsafe {
        let fd = cvt(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let one: libc::c_int = 1;
        let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let opt = &one as *const libc::c_int as *const libc::c_void;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            opt,
            size,
        );
        libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, opt, size);
        let src = sockaddr(SocketAddrV4::new(source, 0));
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, &src as *const _ as *const libc::sockaddr, len) < 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        let dst = sockaddr(target);
        if libc::connect(fd, &dst as *const _ as *const libc::sockaddr, len) < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                libc::close(fd);
                return Err(e);
            }
        }
        Ok(fd)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    /// TCP connect or WebSocket upgrade in progress.
    Opening,
    Open,
    Closed,
}

/// A WebSocket client socket.
pub struct Ws {
    pub fd: RawFd,
    pub phase: Phase,
    /// Caller's data (e.g. the channel index).
    pub tag: u32,
    /// Caller's state machine step.
    pub step: u8,
    /// When the caller started the current step (ns).
    pub since: u64,
    /// The status code of the server's close frame (0 when it had none), once one arrived.
    pub close_code: Option<u16>,
    /// With `Pool::stamp_receives`: when the kernel received the bytes of the last read
    /// (CLOCK_REALTIME ns), 0 when that read carried no timestamp (an EOF, an error).
    pub rx_stamp_ns: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    mask: u32,
}

/// What a WebSocket client got.
pub enum WsEvent<'a> {
    Text(&'a [u8]),
    /// Closed by the server (close frame, EOF or error).
    Closed,
}

impl Ws {
    /// Queues a masked text frame and writes what the socket takes.
    pub fn send_text(&mut self, payload: &[u8]) {
        self.mask = self
            .mask
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        encode_frame(&mut self.out, 0x81, payload, Some(self.mask.to_be_bytes()));
        self.flush();
    }

    /// Queues bytes exactly as given (no framing, no masking) and writes what the socket takes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
        self.flush();
    }

    fn send_control(&mut self, opcode: u8, payload: &[u8]) {
        self.out.push(0x80 | opcode);
        self.out.push(0x80 | payload.len() as u8);
        self.out.extend_from_slice(&[0, 0, 0, 0]);
        self.out.extend_from_slice(payload);
        self.flush();
    }

    fn flush(&mut self) {
        if self.phase != Phase::Closed {
            send_pending(self.fd, &mut self.out);
        }
    }
}

/// Appends one WebSocket frame to `out`: `first` is the FIN/RSV/opcode byte, and the payload is
/// masked when `mask` is given (clients must mask; hostile tests may not).
pub fn encode_frame(out: &mut Vec<u8>, first: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(first);
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let Some(mask) = mask else {
        out.extend_from_slice(payload);
        return;
    };
    out.extend_from_slice(&mask);
    let body = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[body..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Writes as much of `out` as the socket takes and drops what was written. On EAGAIN the rest
/// waits for EPOLLOUT; errors surface on the next read.
fn send_pending(fd: RawFd, out: &mut Vec<u8>) {
    while !out.is_empty() {
        // SAFETY: writes from a live buffer to a descriptor the pool owns.
        let n = unsafe {
            libc::send(
                fd,
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return;
        }
        out.drain(..n as usize);
    }
}

fn enable_rx_stamps(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: sets an option on a descriptor the pool owns, from a live int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// `recv` into `buf`, with the kernel's receive time of those bytes (CLOCK_REALTIME ns, 0 when
/// the read carried none).
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> (isize, u64) {
    // Room for one SCM_TIMESTAMPNS message (a timespec), aligned for cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: reads into `buf` and `control`, both described by `msg` with their lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    let mut stamp = 0;
    if n > 0 {
        // SAFETY: walks the control messages the kernel wrote within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                    stamp = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    (n, stamp)
}

/// A keep-alive HTTP/1.1 client socket with at most one request in flight.
pub struct Http {
    pub fd: RawFd,
    /// The server this connection talks to (a cluster's publisher spreads over its nodes).
    target: SocketAddrV4,
    pub busy: bool,
    pub sent_at: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    pub broken: bool,
}

impl Http {
    fn new(fd: RawFd, target: SocketAddrV4) -> Http {
        Http {
            fd,
            target,
            busy: false,
            sent_at: 0,
            inbuf: Vec::new(),
            out: Vec::new(),
            broken: false,
        }
    }

    pub fn send(&mut self, request: &[u8], now: u64) {
        self.busy = true;
        self.sent_at = now;
        self.out.extend_from_slice(request);
        self.flush();
    }

    fn flush(&mut self) {
        send_pending(self.fd, &mut self.out);
    }
}

const HTTP_TOKEN: u64 = 1 << 40;

pub struct Pool {
    epfd: RawFd,
    target: SocketAddrV4,
    upgrade_request: Vec<u8>,
    first_source: u32,
    opened_total: usize,
    pub ws: Vec<Ws>,
    free: Vec<usize>,
    pub http: Vec<Http>,
    scratch: Vec<u8>,
    events: Vec<libc::epoll_event>,
    /// Sockets whose upgrade has not completed.
    pub opening: usize,
    pub connect_errors: usize,
    pub upgrade_errors: usize,
    /// WebSocket reads take the kernel's receive timestamps (`stamp_receives`).
    rx_stamps: bool,
}

impl Pool {
    pub fn new(target: SocketAddrV4, upgrade_request: Vec<u8>, first_source: u32) -> Pool {
        // SAFETY: creates a new epoll descriptor owned by the pool.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0, "epoll_create1 failed");
        Pool {
            epfd,
            target,
            upgrade_request,
            first_source,
            opened_total: 0,
            ws: Vec::new(),
            free: Vec::new(),
            http: Vec::new(),
            scratch: vec![0; 256 * 1024],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
            opening: 0,
            connect_errors: 0,
            upgrade_errors: 0,
            rx_stamps: false,
        }
    }

    /// From now on every WebSocket read records when the kernel received its bytes
    /// (`Ws::rx_stamp_ns`, SO_TIMESTAMPNS): on loopback that is when the server sent them,
    /// however late this process gets to read them.
    pub fn stamp_receives(&mut self) {
        self.rx_stamps = true;
        for ws in self.ws.iter().filter(|ws| ws.phase != Phase::Closed) {
            enable_rx_stamps(ws.fd);
        }
    }

    fn register(&self, fd: RawFd, token: u64) {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: registers our own descriptor with our epoll instance.
        unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    }

    /// Opens a WebSocket client; returns its index (stable until it is closed).
    pub fn open_ws(&mut self, tag: u32, now: u64) -> Option<usize> {
        let request = self.upgrade_request.clone();
        self.open_with(tag, now, request)
    }

    /// Opens a client socket that first sends `first_bytes` instead of the upgrade request
    /// (the caller sends the rest with `send_raw`); it counts as opening until a 101 arrives.
    pub fn open_with(&mut self, tag: u32, now: u64, first_bytes: Vec<u8>) -> Option<usize> {
        let source = source_addr(self.first_source, self.opened_total % (PER_SOURCE * 200));
        self.opened_total += 1;
        let fd = match connect_from(source, self.target) {
            Ok(fd) => fd,
            Err(_) => {
                self.connect_errors += 1;
                return None;
            }
        };
        let ws = Ws {
            fd,
            phase: Phase::Opening,
            tag,
            step: 0,
            since: now,
            close_code: None,
            rx_stamp_ns: 0,
            inbuf: Vec::new(),
            out: first_bytes,
            mask: fd as u32 ^ 0x9e37_79b9,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.ws[i] = ws;
                i
            }
            None => {
                self.ws.push(ws);
                self.ws.len() - 1
            }
        };
        self.opening += 1;
        if self.rx_stamps {
            enable_rx_stamps(fd);
        }
        self.register(fd, idx as u64);
        Some(idx)
    }

    pub fn close_ws(&mut self, idx: usize) {
        let ws = &mut self.ws[idx];
        if ws.phase == Phase::Closed {
            return;
        }
        if ws.phase == Phase::Opening {
            self.opening -= 1;
        }
        ws.phase = Phase::Closed;
        // SAFETY: closes our own descriptor once (phase guards against a second close).
        unsafe { libc::close(ws.fd) };
        ws.inbuf = Vec::new();
        ws.out = Vec::new();
        self.free.push(idx);
    }

    /// Opens a keep-alive HTTP connection to `target` from 127.0.0.1.
    pub fn open_http_to(&mut self, target: SocketAddrV4) -> io::Result<usize> {
        let fd = connect_from(Ipv4Addr::LOCALHOST, target)?;
        self.http.push(Http::new(fd, target));
        let idx = self.http.len() - 1;
        self.register(fd, HTTP_TOKEN | idx as u64);
        Ok(idx)
    }

    /// Replaces a closed HTTP connection (servers may answer `Connection: close`).
    pub fn reopen_http(&mut self, idx: usize) -> io::Result<()> {
        let target = self.http[idx].target;
        let fd = connect_from(Ipv4Addr::LOCALHOST, target)?;
        let old = std::mem::replace(&mut self.http[idx], Http::new(fd, target));
        // SAFETY: closes the replaced connection's descriptor, which the pool owned.
        unsafe { libc::close(old.fd) };
        self.register(fd, HTTP_TOKEN | idx as u64);
        Ok(())
    }

    /// Waits up to `timeout_ms` and hands every received text frame to `on_ws`, and every
    /// completed HTTP response (index, status) to `on_http`.
    pub fn poll(
        &mut self,
        timeout_ms: i32,
        on_ws: &mut dyn FnMut(&mut Ws, usize, WsEvent<'_>),
        on_http: &mut dyn FnMut(usize, u16, u64),
    ) {
        // SAFETY: the events buffer outlives the call and its length is passed.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        for i in 0..n.max(0) as usize {
            let ev = self.events[i];
            let token = ev.u64;
            if token & HTTP_TOKEN != 0 {
                self.http_ready((token & !HTTP_TOKEN) as usize, ev.events, on_http);
            } else {
                self.ws_ready(token as usize, ev.events, on_ws);
            }
        }
    }

    fn ws_ready(
        &mut self,
        idx: usize,
        events: u32,
        on_ws: &mut dyn FnMut(&mut Ws, usize, WsEvent<'_>),
    ) {
        if idx >= self.ws.len() || self.ws[idx].phase == Phase::Closed {
            return;
        }
        if events & libc::EPOLLOUT as u32 != 0 {
            self.ws[idx].flush();
        }
        if events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0
        {
            return;
        }
        loop {
            let fd = self.ws[idx].fd;
            let n = if self.rx_stamps {
                let (n, stamp) = recv_stamped(fd, &mut self.scratch);
                self.ws[idx].rx_stamp_ns = stamp;
                n
            } else {
                // SAFETY: reads into our own scratch buffer.
                unsafe {
                    libc::recv(
                        fd,
                        self.scratch.as_mut_ptr().cast(),
                        self.scratch.len(),
                        libc::MSG_DONTWAIT,
                    )
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return;
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
            }
            if n <= 0 {
                if self.ws[idx].phase == Phase::Opening {
                    self.upgrade_errors += 1;
                }
                on_ws(&mut self.ws[idx], idx, WsEvent::Closed);
                self.close_ws(idx);
                return;
            }
            let chunk = &self.scratch[..n as usize];
            let ws = &mut self.ws[idx];
            let closed = if ws.inbuf.is_empty() {
                let (used, closed) = consume(ws, idx, chunk, &mut self.opening, on_ws);
                if !closed {
                    ws.inbuf.extend_from_slice(&chunk[used..]);
                }
                closed
            } else {
                let mut buf = std::mem::take(&mut ws.inbuf);
                buf.extend_from_slice(chunk);
                let (used, closed) = consume(ws, idx, &buf, &mut self.opening, on_ws);
                buf.drain(..used);
                if buf.capacity() > 64 * 1024 && buf.len() < 1024 {
                    buf.shrink_to(1024);
                }
                ws.inbuf = buf;
                closed
            };
            if closed {
                if self.ws[idx].phase == Phase::Opening {
                    self.upgrade_errors += 1;
                }
                on_ws(&mut self.ws[idx], idx, WsEvent::Closed);
                self.close_ws(idx);
                return;
            }
            // A short read drained the socket; data arriving later raises a new edge.
            if (n as usize) < self.scratch.len() {
                return;
            }
        }
    }

    fn http_ready(&mut self, idx: usize, events: u32, on_http: &mut dyn FnMut(usize, u16, u64)) {
        let Some(h) = self.http.get_mut(idx) else {
            return;
        };
        if events & libc::EPOLLOUT as u32 != 0 {
            h.flush();
        }
        loop {
            // SAFETY: reads into our own scratch buffer.
            let n = unsafe {
                libc::recv(
                    h.fd,
                    self.scratch.as_mut_ptr().cast(),
                    self.scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                return;
            }
            if n <= 0 {
                h.broken = true;
                if h.busy {
                    h.busy = false;
                    on_http(idx, 0, h.sent_at);
                }
                return;
            }
            h.inbuf.extend_from_slice(&self.scratch[..n as usize]);
            while let Some((status, len, close)) = parse_response(&h.inbuf) {
                h.inbuf.drain(..len);
                h.busy = false;
                h.broken |= close;
                on_http(idx, status, h.sent_at);
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for i in 0..self.ws.len() {
            self.close_ws(i);
        }
        for h in &self.http {
            // SAFETY: closes descriptors the pool owns.
            unsafe { libc::close(h.fd) };
        }
        // SAFETY: as above.
        unsafe { libc::close(self.epfd) };
    }
}

/// Parses the upgrade response, then frames. Returns (bytes used, closed).
fn consume(
    ws: &mut Ws,
    idx: usize,
    mut buf: &[u8],
    opening: &mut usize,
    on_ws: &mut dyn FnMut(&mut Ws, usize, WsEvent<'_>),
) -> (usize, bool) {
    let total = buf.len();
    if ws.phase == Phase::Opening {
        let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
            return (0, false);
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            return (total, true);
        }
        ws.phase = Phase::Open;
        *opening -= 1;
        buf = &buf[end + 4..];
    }
    loop {
        if buf.len() < 2 {
            break;
        }
        let opcode = buf[0] & 0x0f;
        let (len, header) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if buf.len() < header + len {
            break;
        }
        let payload = &buf[header..header + len];
        match opcode {
            0x1 | 0x0 => on_ws(ws, idx, WsEvent::Text(payload)),
            0x9 => {
                let p = payload.to_vec();
                ws.send_control(0xA, &p);
            }
            0x8 => {
                ws.close_code = Some(match payload {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => 0,
                });
                return (total, true);
            }
            _ => {}
        }
        buf = &buf[header + len..];
    }
    (total - buf.len(), false)
}

/// (status, bytes of the whole response, `Connection: close`) once a response is complete.
fn parse_response(buf: &[u8]) -> Option<(u16, usize, bool)> {
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status = head.get(9..12)?.parse().ok()?;
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let close = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close")
        })
    });
    (buf.len() >= head_end + length).then_some((status, head_end + length, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_need_their_whole_body() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r), Some((200, r.len(), false)));
        assert_eq!(parse_response(&r[..r.len() - 1]), None);
        let r = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        assert_eq!(parse_response(r), Some((413, r.len(), true)));
    }

    #[test]
    fn frames_are_encoded_masked_or_not() {
        let mut out = Vec::new();
        encode_frame(&mut out, 0x81, b"hi", Some([1, 2, 3, 4]));
        assert_eq!(out, [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
        out.clear();
        encode_frame(&mut out, 0x83, &[7; 200], None);
        assert_eq!(&out[..4], &[0x83, 126, 0, 200]);
        assert_eq!(out.len(), 4 + 200);
    }

    #[test]
    fn close_frames_report_their_code() {
        let mut opening = 0;
        let mut ws = Ws {
            fd: -1,
            phase: Phase::Open,
            tag: 0,
            step: 0,
            since: 0,
            close_code: None,
            rx_stamp_ns: 0,
            inbuf: Vec::new(),
            out: Vec::new(),
            mask: 0,
        };
        let frame = [0x88, 2, 0x03, 0xea]; // close 1002
        let (_, closed) = consume(&mut ws, 0, &frame, &mut opening, &mut |_, _, _| {});
        assert!(closed);
        assert_eq!(ws.close_code, Some(1002));
        ws.close_code = None;
        let (_, closed) = consume(&mut ws, 0, &[0x88, 0], &mut opening, &mut |_, _, _| {});
        assert!(closed);
        assert_eq!(ws.close_code, Some(0));
    }

    #[test]
    fn source_addresses_rotate_past_the_port_range() {
        assert_eq!(source_addr(2, 0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_addr(2, 20_000), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(source_addr(300, 0), Ipv4Addr::new(127, 0, 1, 44));
    }
}
