//! The device's UDP sockets as webrtc-rs sees them: tokio's, with the nominating checks its ICE agent left unanswered handed back to it (`protocol::nomination`).
//!
//! webrtc-rs takes its sockets from a [`Runtime`]; [`IceRuntime`] is its tokio runtime with
//! each UDP socket wrapped in a [`NominatingSocket`], and everything else passed through.
//! Remove it once rtc-ice answers nominations on pairs still being checked (see
//! `protocol::nomination`).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime,
    TokioRuntime, Transmit,
};

use crate::protocol::nomination::{HeldNominations, may_be_stun};

/// webrtc-rs's tokio runtime, whose UDP sockets hand unanswered nominations back to the agent.
#[derive(Debug)]
pub(crate) struct IceRuntime {
    tokio: TokioRuntime,
}

impl IceRuntime {
    /// The runtime to build a peer connection with.
    pub fn runtime() -> Arc<dyn Runtime> {
        Arc::new(Self {
            tokio: TokioRuntime,
        })
    }
}

impl Runtime for IceRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.tokio.spawn(future)
    }

    fn spawn_reactor(
        &self,
        reactor_pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.tokio.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = self.tokio.wrap_udp_socket(socket)?;
        Ok(Arc::new(NominatingSocket {
            inner,
            state: Mutex::default(),
        }))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.tokio.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.tokio.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.tokio.resolve_host(host)
    }

    fn now(&self) -> Instant {
        self.tokio.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.tokio.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.tokio.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.tokio.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.tokio.yield_now()
    }

    fn name(&self) -> &'static str {
        "tokio (rtcam ICE sockets)"
    }
}

#[derive(Debug, Default)]
struct SocketState {
    held: HeldNominations,
    /// Kept checks due to the agent, with the receive metadata of the datagram they came in.
    due: VecDeque<(RecvMeta, Vec<u8>)>,
}

/// A UDP socket that watches STUN going through it and hands the agent a kept nomination
/// right after the success response that makes it answerable.
#[derive(Debug)]
struct NominatingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    state: Mutex<SocketState>,
}

impl NominatingSocket {
    fn state(&self) -> MutexGuard<'_, SocketState> {
        // The state stays consistent whatever panicked while holding it (none of its
        // updates can be left half-done), so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AsyncUdpSocket for NominatingSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn poll_send(&self, cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        // STUN is never sent as several GSO segments; a single datagram is all there is to see.
        // Media (every RTP packet) is told apart before the lock.
        if transmit
            .segment_size
            .is_none_or(|size| size >= transmit.contents.len())
            && may_be_stun(transmit.contents)
        {
            self.state()
                .held
                .outbound(transmit.destination, transmit.contents);
        }
        self.inner.poll_send(cx, transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let (Some(buf), Some(slot)) = (bufs.first_mut(), meta.first_mut()) {
            let mut state = self.state();
            // A buffer too small for a STUN check cannot occur (webrtc-rs reads into at
            // least one MTU); such a check would be dropped like any truncated datagram.
            while let Some((recv_meta, check)) = state.due.pop_front() {
                if let Some(target) = buf.get_mut(..check.len()) {
                    target.copy_from_slice(&check);
                    *slot = recv_meta;
                    return Poll::Ready(Ok(1));
                }
            }
        }
        let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
        let now = Instant::now();
        let mut state = self.state();
        for (buf, recv_meta) in bufs.iter().zip(meta.iter()).take(n) {
            let received = buf.get(..recv_meta.len).unwrap_or_default();
            // One message may hold several same-sized datagrams coalesced by GRO.
            for datagram in received.chunks(recv_meta.stride.max(1)) {
                if !may_be_stun(datagram) {
                    continue;
                }
                if let Some(check) = state.held.inbound(now, recv_meta.addr, datagram) {
                    let mut due_meta = *recv_meta;
                    due_meta.len = check.len();
                    due_meta.stride = check.len();
                    state.due.push_back((due_meta, check));
                }
            }
        }
        if !state.due.is_empty() {
            // The check must follow at once, whoever polls next.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(n))
    }

    fn max_gso_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }

    fn max_gro_segments(&self) -> usize {
        self.inner.max_gro_segments()
    }
}
