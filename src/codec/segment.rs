//! TEMPORARY placeholder, replaced by the real segmenter before commit.
pub const VNET_HDR_LEN: usize = 10;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentError { NotIp }
#[derive(Default)]
pub struct Segmenter;
impl Segmenter {
    pub fn new() -> Self { Segmenter }
    pub fn segments(&mut self, _vnet: Option<&[u8; VNET_HDR_LEN]>, _packet: &[u8], _out: impl FnMut(&[u8])) -> Result<usize, SegmentError> { Err(SegmentError::NotIp) }
}
