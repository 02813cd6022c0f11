//! A raw NBD client for hostile-input tests: the protocol's bytes, written
//! by hand, so a test can send what no real client would.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

pub fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
    (u32::from_be_bytes(b[4..8].try_into().unwrap()), u64::from_be_bytes(b[8..16].try_into().unwrap()))
}

pub fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

pub fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    (u32::from_be_bytes(h[12..16].try_into().unwrap()), data)
}

pub fn connect(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    s
}

/// Negotiates export `name` with NBD_OPT_GO on a new connection; the type of
/// the final option reply (1, NBD_REP_ACK, when the export was opened) and its text.
pub fn go(socket: &Path, name: &str) -> (UnixStream, u32, String) {
    let mut s = connect(socket);
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, 7, &data);
    loop {
        let (kind, body) = option_reply(&mut s);
        if kind == 1 || kind & (1 << 31) != 0 {
            return (s, kind, String::from_utf8_lossy(&body).into_owned());
        }
    }
}
