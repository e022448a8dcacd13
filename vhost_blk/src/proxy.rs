//! Relays vhost-user messages between the front-end and vhost-user-backend.
//!
//! vhost 0.18's `Backend` (the back-end request channel) has no way to send
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, and the channel's fd is private. The
//! relay sits on the front-end connection, forwards every message with its
//! fds unchanged, and keeps a copy of the fd of SET_BACKEND_REQ_FD so the
//! device can announce a resize. It only carries the control plane; the data
//! path (shared memory, kick/call eventfds) does not go through it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::device::BlkBackend;

const HEADER_SIZE: usize = 12;
/// A resize notification must not block the caller on a stuck front-end.
const BACKEND_REQ_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Receives one message (header, body and attached fds) from the front-end.
/// Returns None at end of stream.
fn recv_message(front: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut msg = vec![0u8; HEADER_SIZE];
    let mut raw_fds: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: HEADER_SIZE,
    }];
    // SAFETY: the iovec points to `msg`, which is valid for HEADER_SIZE bytes.
    let (n, nfds) = unsafe { front.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds
        .iter()
        .take(nfds)
        // SAFETY: recvmsg just gave us these fds; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut reader = front;
    reader.read_exact(&mut msg[n..])?;
    let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes exceeds the limit of {MAX_MSG_SIZE}"),
        ));
    }
    msg.resize(HEADER_SIZE + size, 0);
    reader.read_exact(&mut msg[HEADER_SIZE..])?;
    Ok(Some((msg, fds)))
}

fn send_message(back: &UnixStream, msg: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = back
        .send_with_fds(&[msg], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut writer = back;
    writer.write_all(msg.get(sent..).unwrap_or_default())
}

/// Forwards front-end requests to the back-end until either side closes.
pub(crate) fn relay_requests(
    front: &UnixStream,
    back: &UnixStream,
    device: &BlkBackend,
) -> io::Result<()> {
    let set_backend_req_fd: u32 = FrontendReq::SET_BACKEND_REQ_FD.into();
    let result = loop {
        let (msg, fds) = match recv_message(front) {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let request = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        if request == set_backend_req_fd {
            if let Some(fd) = fds.first() {
                let stream = UnixStream::from(fd.try_clone()?);
                stream.set_write_timeout(Some(BACKEND_REQ_WRITE_TIMEOUT))?;
                device.set_backend_req_stream(stream);
            }
        }
        if let Err(e) = send_message(back, &msg, &fds) {
            break Err(e);
        }
    };
    let _ = back.shutdown(Shutdown::Both);
    let _ = front.shutdown(Shutdown::Both);
    result
}

/// Copies back-end replies to the front-end until either side closes.
/// vhost-user-backend sends no fds with the features we offer.
pub(crate) fn relay_replies(back: &UnixStream, front: &UnixStream) {
    let (mut from, mut to) = (back, front);
    let _ = io::copy(&mut from, &mut to);
    let _ = front.shutdown(Shutdown::Both);
    let _ = back.shutdown(Shutdown::Both);
}
