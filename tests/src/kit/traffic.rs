//! Traffic for the end-to-end tests: socket servers on a tunnel client, real clients (nc,
//! connected sockets), and a raw socket that sees ICMP errors as they arrived.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::kit::{ScratchDir, netns::Netns};

/// Upper bound for any server a test starts: it stops by itself even if the test hangs.
pub const SERVER_LIFETIME: Duration = Duration::from_secs(120);

/// Socket servers running in a namespace; stopped and joined on drop.
#[derive(Default)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn new() -> Self {
        Self::default()
    }

    /// A TCP server on `port` that hands each accepted connection (blocking, with the peer's
    /// address) to `handle`, one at a time, until the test ends.
    pub fn tcp(
        &mut self,
        ns: &Netns,
        port: u16,
        handle: impl Fn(std::net::TcpStream, std::net::SocketAddr) + Send + 'static,
    ) {
        let listener = ns
            .within(move || TcpListener::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        self.threads.push(thread::spawn(move || {
            let deadline = Instant::now() + SERVER_LIFETIME;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        conn.set_nonblocking(false).unwrap();
                        handle(conn, peer);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        }));
    }

    /// An HTTP responder on `port` whose body names the port and the peer's address, so a test
    /// can see which target a connection reached and that its source address was kept.
    pub fn http(&mut self, ns: &Netns, port: u16) {
        self.tcp(ns, port, move |mut conn, peer| {
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let body = format!("port {port} from {}", peer.ip());
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        });
    }

    /// A TCP server on `port` that reads each connection to its end and answers with the
    /// number of bytes it read.
    pub fn tcp_sink(&mut self, ns: &Netns, port: u16) {
        self.tcp(ns, port, |mut conn, _| {
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut total = 0usize;
            let mut buf = vec![0u8; 65536];
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                total += n;
            }
            let _ = write!(conn, "{total}");
        });
    }

    /// A UDP server on `port` that answers each datagram with "pong:" and the datagram.
    pub fn udp_echo(&mut self, ns: &Netns, port: u16) {
        let socket = ns
            .within(move || UdpSocket::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = self.stop.clone();
        self.threads.push(thread::spawn(move || {
            let deadline = Instant::now() + SERVER_LIFETIME;
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let mut reply = b"pong:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, peer);
                }
            }
        }));
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A directory holding one page, removed on drop.
pub fn web_root(name: &str, body: &str) -> ScratchDir {
    let dir = ScratchDir::claim(
        std::env::temp_dir().join(format!("pf-e2e-{}-{name}", std::process::id())),
    );
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("index.html"), body).unwrap();
    dir
}

/// One UDP request/reply through `nc`, as a customer's peer would send it.
pub fn udp_round_trip(ns: &Netns, host: &str, port: u16, message: &str) -> String {
    let mut child = ns
        .cmd(&["nc", "-u", "-w", "2", host, &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running nc");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("nc output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A raw socket receiving every ICMP message that reaches a namespace, so a test can see an
/// error exactly as it arrived.
pub struct IcmpCapture(std::os::fd::OwnedFd);

impl IcmpCapture {
    pub fn open(ns: &Netns) -> Self {
        let fd = ns
            .within(|| {
                // SAFETY: plain socket(2); the result is checked.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
                assert!(
                    fd >= 0,
                    "raw ICMP socket: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: a descriptor we own from here on.
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            })
            .unwrap();
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid socket and a timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        Self(fd)
    }

    /// The first ICMP error (IPv4 packet, outer header included) received within `wait` that
    /// `wanted` accepts.
    pub fn error_where(&self, wait: Duration, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: reads into a buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n > 0 && wanted(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

/// The fields of an ICMP error a test checks: (outer source, type, code, quoted source,
/// quoted source port, quoted destination, quoted destination port).
pub type ErrorFields = ([u8; 4], u8, u8, [u8; 4], u16, [u8; 4], u16);

pub fn error_fields(packet: &[u8]) -> ErrorFields {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let icmp = &packet[ihl..];
    let quoted = &icmp[8..];
    let quoted_ihl = usize::from(quoted[0] & 0x0f) * 4;
    let ports = &quoted[quoted_ihl..];
    let four = |b: &[u8]| -> [u8; 4] { b[..4].try_into().unwrap() };
    (
        four(&packet[12..]),
        icmp[0],
        icmp[1],
        four(&quoted[12..]),
        u16::from_be_bytes([ports[0], ports[1]]),
        four(&quoted[16..]),
        u16::from_be_bytes([ports[2], ports[3]]),
    )
}

pub fn ip(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

/// Sends one datagram from `local` to `peer` on a connected socket in `ns`, and waits up to
/// 3 s for the answer: its length, or the error the socket reports (ECONNREFUSED when an ICMP
/// port unreachable about the datagram came back).
pub fn udp_answer(
    ns: &Netns,
    local: (&'static str, u16),
    peer: (&'static str, u16),
) -> Result<usize, ErrorKind> {
    ns.within(move || {
        let socket = UdpSocket::bind(local).unwrap();
        socket.connect(peer).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket.send(b"is anyone there?").unwrap();
        socket.recv(&mut [0u8; 64]).map_err(|e| e.kind())
    })
    .unwrap()
}

/// A TCP upload of `bytes` from `inet` to `PUBLIC_IP:port`, whose target reads it all and
/// answers with the count it read: that answer, or what went wrong. `timeout` bounds each
/// write and the read.
pub fn upload_to_public(
    inet: &Netns,
    port: u16,
    bytes: usize,
    timeout: Duration,
) -> std::io::Result<String> {
    use crate::kit::topology::PUBLIC_IP;
    inet.within(move || -> std::io::Result<String> {
        let mut conn = std::net::TcpStream::connect_timeout(
            &format!("{PUBLIC_IP}:{port}").parse().unwrap(),
            Duration::from_secs(5),
        )?;
        conn.set_write_timeout(Some(timeout))?;
        conn.set_read_timeout(Some(timeout))?;
        let chunk = vec![0x5a; 65536];
        for _ in 0..bytes / chunk.len() {
            conn.write_all(&chunk)?;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        Ok(reply)
    })
    .unwrap()
}
