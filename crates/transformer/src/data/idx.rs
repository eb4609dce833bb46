//! IDX files, the format of MNIST, Fashion-MNIST, KMNIST and EMNIST, raw or gzipped (by their
//! first two bytes): a magic number (two zero bytes, the element type, the number of
//! dimensions), the dimensions as big-endian u32, then the elements in row-major order.
//! Only unsigned bytes (type 0x08) are read, which is what the image and label files hold.
//!
//! The header is read first and exactly the bytes it announces after it, so a gzip file that
//! inflates to more than it says is caught without inflating it all.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::{Device, Tensor};

use super::resize::Pixels;
use crate::{Error, Result};

/// Most elements an IDX file may announce (Fashion-MNIST's training images are 47 M): the
/// header is untrusted, and 2^32 bytes would be allocated on its word.
pub const MAX_IDX_ELEMENTS: usize = 1 << 32;

fn bad(path: &Path, problem: impl Into<String>) -> Error {
    Error::Path {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// An n-dimensional array of bytes from an IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    /// Row-major elements, `dims.iter().product()` of them.
    pub data: Vec<u8>,
}

/// Read an IDX file of unsigned bytes, gzipped or not.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let mut file = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut file, &mut magic).map_err(|e| Error::io(path, e))?;
    let head = &magic[..n];
    let rest = file;
    if head == [0x1f, 0x8b] {
        let gz = flate2::read::MultiGzDecoder::new(std::io::Cursor::new(head.to_vec()).chain(rest));
        read_idx_from(gz, path, true)
    } else {
        read_idx_from(std::io::Cursor::new(head.to_vec()).chain(rest), path, false)
    }
}

/// Fill `buf` as far as the stream goes; the number of bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_idx_from(mut r: impl Read, path: &Path, gzip: bool) -> Result<IdxArray> {
    let what = if gzip { "gzipped IDX" } else { "IDX" };
    // A gzip stream that is corrupt fails inside `read`: say so rather than "I/O error".
    let io = |e: std::io::Error| bad(path, format!("cannot read the {what} file: {e}"));
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut r, &mut magic).map_err(io)?;
    if n < 4 || magic[0] != 0 || magic[1] != 0 {
        return Err(bad(
            path,
            format!(
                "not an IDX file (it must start with two zero bytes, a type and a rank; got \
                 {:02x?})",
                &magic[..n]
            ),
        ));
    }
    if magic[2] != 0x08 {
        return Err(bad(
            path,
            format!(
                "IDX element type 0x{:02x}; only unsigned bytes (0x08) are read",
                magic[2]
            ),
        ));
    }
    let rank = magic[3] as usize;
    if rank == 0 {
        return Err(bad(path, "IDX file of rank 0"));
    }
    let mut raw = vec![0u8; 4 * rank];
    if read_up_to(&mut r, &mut raw).map_err(io)? < raw.len() {
        return Err(bad(
            path,
            format!("truncated IDX header: {rank} dimensions announced"),
        ));
    }
    let dims: Vec<usize> = raw
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&c| c <= MAX_IDX_ELEMENTS)
        .ok_or_else(|| {
            bad(
                path,
                format!("IDX dimensions {dims:?} exceed {MAX_IDX_ELEMENTS} elements"),
            )
        })?;
    let mut data = vec![0u8; count];
    let got = read_up_to(&mut r, &mut data).map_err(io)?;
    if got < count {
        return Err(bad(
            path,
            format!(
                "truncated: the header announces {dims:?} = {count} bytes of data, the file \
                 holds {got}"
            ),
        ));
    }
    let mut extra = [0u8; 1];
    if read_up_to(&mut r, &mut extra).map_err(io)? > 0 {
        return Err(bad(
            path,
            format!("more data than the header announces ({dims:?} = {count} bytes)"),
        ));
    }
    Ok(IdxArray { dims, data })
}

/// Grey images with integer labels: an IDX image file (N, H, W) and its label file (N).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledImages {
    pub height: usize,
    pub width: usize,
    /// (N, H, W) bytes, row-major.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
}

impl LabelledImages {
    /// Read an image file and a label file and check that they agree.
    pub fn read_idx(images: &Path, labels: &Path) -> Result<Self> {
        let img = read_idx(images)?;
        let lab = read_idx(labels)?;
        let [n, h, w] = img.dims[..] else {
            return Err(bad(
                images,
                format!(
                    "an image file must have 3 dimensions (N, H, W); it has {:?}",
                    img.dims
                ),
            ));
        };
        let [m] = lab.dims[..] else {
            return Err(bad(
                labels,
                format!(
                    "a label file must have 1 dimension (N); it has {:?}",
                    lab.dims
                ),
            ));
        };
        if n != m {
            return Err(bad(
                labels,
                format!(
                    "{m} labels for the {n} images of {}: the counts must agree",
                    images.display()
                ),
            ));
        }
        if h == 0 || w == 0 {
            return Err(bad(images, format!("images of {h}x{w} pixels")));
        }
        Ok(LabelledImages {
            height: h,
            width: w,
            pixels: img.data,
            labels: lab.data,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The `H·W` bytes of image `i` (row-major) and its label.
    pub fn bytes(&self, i: usize) -> Result<(&[u8], u8)> {
        if i >= self.len() {
            return Err(Error::input(
                "image index",
                format!("< {}", self.len()),
                i.to_string(),
            ));
        }
        let size = self.height * self.width;
        Ok((&self.pixels[i * size..(i + 1) * size], self.labels[i]))
    }

    /// Image `i` as grey pixels.
    pub fn image(&self, i: usize) -> Result<Pixels> {
        let (bytes, _) = self.bytes(i)?;
        Pixels::new(self.width, self.height, 1, bytes.to_vec())
    }

    /// Images `indices` rescaled to [0, 1] and normalized by `mean` and `std`, with their labels.
    ///
    /// # Shapes
    /// → pixels (B, 1, H, W) f32, labels (B) u32
    pub fn batch(
        &self,
        indices: &[usize],
        mean: f32,
        std: f32,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let size = self.height * self.width;
        let mut px = Vec::with_capacity(indices.len() * size);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let (bytes, label) = self.bytes(i)?;
            px.extend(
                bytes
                    .iter()
                    .map(|&v| ((v as f64 / 255.0) as f32 - mean) / std),
            );
            labels.push(label as u32);
        }
        let b = indices.len();
        Ok((
            Tensor::from_vec(px, (b, 1, self.height, self.width), device)?,
            Tensor::from_vec(labels, b, device)?,
        ))
    }
}
