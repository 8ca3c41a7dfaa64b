//! A storage that records every change (writes, length changes, holes, flushes) for
//! crash simulation: replaying any prefix of the log, or any subset of the changes
//! since the last flush, gives a state the disk could be in after a power cut.

use super::{MemoryStorage, Storage};
use parking_lot::Mutex;
use std::io;

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    PunchHole { offset: u64, len: u64 },
    Flush,
}

#[derive(Debug)]
pub struct RecordingStorage {
    inner: MemoryStorage,
    log: Mutex<Vec<Op>>,
}

impl RecordingStorage {
    /// Starts from `initial` bytes with an empty log.
    pub fn new(initial: Vec<u8>) -> Self {
        RecordingStorage {
            inner: MemoryStorage::from_vec(initial),
            log: Mutex::new(Vec::new()),
        }
    }

    pub fn log(&self) -> Vec<Op> {
        self.log.lock().clone()
    }

    pub fn contents(&self) -> Vec<u8> {
        self.inner.to_vec()
    }

    /// Applies `ops` to `bytes`, as the disk would have them.
    pub fn replay<'a>(bytes: &mut Vec<u8>, ops: impl IntoIterator<Item = &'a Op>) {
        for op in ops {
            match op {
                Op::Write { offset, data } => {
                    let (o, e) = (*offset as usize, *offset as usize + data.len());
                    if bytes.len() < e {
                        bytes.resize(e, 0);
                    }
                    bytes[o..e].copy_from_slice(data);
                }
                Op::SetLen(l) => bytes.resize(*l as usize, 0),
                Op::PunchHole { offset, len } => {
                    let o = (*offset as usize).min(bytes.len());
                    let e = ((offset + len) as usize).min(bytes.len());
                    bytes[o..e].fill(0);
                }
                Op::Flush => {}
            }
        }
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut log = self.log.lock();
        self.inner.write_at(buf, offset)?;
        log.push(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.log.lock().push(Op::Flush);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut log = self.log.lock();
        self.inner.set_len(len)?;
        log.push(Op::SetLen(len));
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut log = self.log.lock();
        self.inner.punch_hole(offset, len)?;
        log.push(Op::PunchHole { offset, len });
        Ok(())
    }
}
