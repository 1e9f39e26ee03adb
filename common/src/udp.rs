//! UDP sockets for QUIC endpoints (broker and client), with kernel buffers sized for bursts.
//!
//! A QUIC endpoint reads its socket from one task. When that task is late (a busy machine, a
//! pause of the process), datagrams queue in the kernel's receive buffer, and what does not fit
//! is dropped. QUIC then sees loss: it retransmits after a timeout and halves its congestion
//! window, so a pause of a few milliseconds becomes a stall of tens or hundreds. Linux's default
//! buffer (`net.core.rmem_default`, 208 KiB) holds about 4 ms at 50 MB/s. Endpoints here ask for
//! [`BUFFER_BYTES`]; the kernel grants at most `net.core.rmem_max` / `wmem_max`.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Receive and send buffer asked for: about 160 ms at 50 MB/s.
pub const BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// A bound, non-blocking UDP socket with receive and send buffers of up to `buffer_bytes`.
#[derive(Debug)]
pub struct BoundSocket {
    pub socket: std::net::UdpSocket,
    /// The receive buffer the kernel granted, as it reports it (Linux: twice the size set, which
    /// is at most `net.core.rmem_max`).
    pub recv_buffer_bytes: usize,
}

/// Binds `addr` with buffers of up to `buffer_bytes`. A kernel limit below that is not an
/// error: the caller may log [`BoundSocket::recv_buffer_bytes`].
pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<BoundSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps the size at its limit rather than failing.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let recv_buffer_bytes = socket.recv_buffer_size()?;
    Ok(BoundSocket { socket: socket.into(), recv_buffer_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_with_a_larger_receive_buffer_than_the_default() {
        let small = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 4096).expect("bind small");
        let big = bind(SocketAddr::from(([127, 0, 0, 1], 0)), BUFFER_BYTES).expect("bind big");
        assert!(big.socket.local_addr().expect("addr").port() != 0);
        // The kernel grants at least what its default is, and never less for a bigger request.
        assert!(
            big.recv_buffer_bytes > small.recv_buffer_bytes,
            "{} vs {}",
            big.recv_buffer_bytes,
            small.recv_buffer_bytes
        );
    }
}
