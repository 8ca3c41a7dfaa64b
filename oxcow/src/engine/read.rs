//! The read path: walk the runs of a guest range and fill the buffer from data
//! clusters, zeros, compressed clusters or the backing chain.

use super::decompress::decompress;
use super::mapping::Run;
use super::Qcow2;
use crate::error::Result;

impl Qcow2 {
    pub(crate) fn read_range(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (run, n) = self.lookup_run(pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + n as usize];
            match run {
                Run::Unallocated { .. } => self.read_backing(chunk, pos)?,
                Run::Zero { .. } => chunk.fill(0),
                Run::Data { host } => self.data_storage().read_at(chunk, host)?,
                Run::Compressed(d) => self.read_compressed(chunk, pos, d)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    fn read_backing(&self, chunk: &mut [u8], pos: u64) -> Result<()> {
        match &self.backing {
            Some(b) if pos < b.size() => {
                let k = (b.size() - pos).min(chunk.len() as u64) as usize;
                b.read_at(&mut chunk[..k], pos)?;
                chunk[k..].fill(0);
            }
            _ => chunk.fill(0),
        }
        Ok(())
    }

    fn read_compressed(
        &self,
        chunk: &mut [u8],
        pos: u64,
        d: crate::format::compressed::CompressedDescriptor,
    ) -> Result<()> {
        let cs = self.cluster_size() as usize;
        let mut input = vec![0u8; d.byte_len() as usize];
        self.storage.read_at(&mut input, d.offset)?;
        let kind = self.meta.header.compression_type;
        if chunk.len() == cs {
            return decompress(kind, &input, chunk, d.offset);
        }
        let mut cluster = vec![0u8; cs];
        decompress(kind, &input, &mut cluster, d.offset)?;
        let at = (pos % cs as u64) as usize;
        chunk.copy_from_slice(&cluster[at..at + chunk.len()]);
        Ok(())
    }
}
