//! Opening the files a model is read from. Only regular files: a FIFO or a device named like a
//! model file would block the loader forever or never end. Text files (configs, tokenizers) are
//! read whole, so their size is checked first.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// The most a JSON side file (`config.json`, an index, a tokenizer config) may hold.
pub const MAX_JSON_BYTES: u64 = 16 << 20;
/// The most a `tokenizer.json` may hold (real ones reach about 35 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let ty = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ty.is_fifo() {
            return "a FIFO";
        }
        if ty.is_socket() {
            return "a socket";
        }
        if ty.is_block_device() || ty.is_char_device() {
            return "a device";
        }
    }
    if ty.is_dir() { "a directory" } else { "not a regular file" }
}

/// Opens `path` for reading if it is a regular file (symbolic links to one included); returns
/// it with its size. The open itself does not block (a FIFO swapped in after a check would), and
/// the check is made on what was opened.
fn open_checked(path: &Path) -> Result<(File, u64)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotRegularFile { path: path.into(), kind: file_kind(&meta) });
    }
    Ok((file, meta.len()))
}

/// Opens `path` for reading if it is a regular file (symbolic links to one included).
pub fn open_regular(path: &Path) -> Result<File> {
    open_checked(path).map(|(file, _)| file)
}

/// The bytes of the regular file `path`, if it holds at most `max` of them.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let (file, size) = open_checked(path)?;
    if size > max {
        return Err(Error::FileTooLarge { path: path.into(), size, max });
    }
    let mut out = Vec::with_capacity(size as usize);
    // `take`: the file may have grown since its size was read.
    file.take(max + 1).read_to_end(&mut out).map_err(|e| Error::io(path, e))?;
    if out.len() as u64 > max {
        return Err(Error::FileTooLarge { path: path.into(), size: out.len() as u64, max });
    }
    Ok(out)
}

/// The UTF-8 text of the regular file `path`, if it holds at most `max` bytes.
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_bounded(path, max)?).map_err(|_| Error::io(path, std::io::Error::other("not valid UTF-8")))
}
