//! What the guest builder needs to know from ELF files: a program's shared libraries
//! (`DT_NEEDED`) and interpreter, and a kernel module's `.modinfo` dependencies.
//!
//! Parsing is done by `goblin` (a well-kept ELF parser) on bytes, so it is pure and works on
//! files of another root without running `ldd` against the host's libraries.

use goblin::elf::Elf;

/// The dynamic linking needs of one ELF file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct DynamicNeeds {
    /// `DT_NEEDED` sonames, in file order (`libc.so.6`).
    pub libraries: Vec<String>,
    /// `PT_INTERP`, when the file is a dynamically linked program (`/lib64/ld-linux-x86-64.so.2`).
    pub interpreter: Option<String>,
}

/// Reads the dynamic linking needs of an ELF file from its bytes.
pub(crate) fn dynamic_needs(bytes: &[u8]) -> Result<DynamicNeeds, goblin::error::Error> {
    let elf = Elf::parse(bytes)?;
    Ok(DynamicNeeds {
        libraries: elf.libraries.iter().map(|lib| (*lib).to_owned()).collect(),
        interpreter: elf.interpreter.map(str::to_owned),
    })
}

/// The `depends=` entry of a kernel module's `.modinfo` section: the modules that must be
/// loaded before it (`depends=virtio,virtio_ring` → `[virtio, virtio_ring]`).
pub(crate) fn module_depends(bytes: &[u8]) -> Result<Vec<String>, goblin::error::Error> {
    let elf = Elf::parse(bytes)?;
    let Some(section) = elf
        .section_headers
        .iter()
        .find(|header| elf.shdr_strtab.get_at(header.sh_name) == Some(".modinfo"))
    else {
        return Ok(Vec::new());
    };
    let start = usize::try_from(section.sh_offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(usize::try_from(section.sh_size).unwrap_or(usize::MAX));
    let Some(modinfo) = bytes.get(start..end) else {
        return Err(goblin::error::Error::Malformed(
            ".modinfo section lies outside the file".into(),
        ));
    };
    Ok(modinfo_depends(modinfo))
}

/// `.modinfo` is a sequence of NUL-terminated `key=value` strings.
fn modinfo_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|byte| *byte == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_from_nul_separated_entries() {
        // As in virtio_blk.ko of linux-image-6.1.0-56-cloud-amd64.
        let modinfo = b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0";
        assert_eq!(modinfo_depends(modinfo), ["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"depends=\0name=virtio_ring\0").is_empty());
        assert!(modinfo_depends(b"name=x\0").is_empty());
    }

    #[test]
    fn host_program_needs_libc_and_an_interpreter() {
        // Any dynamically linked program of the host will do: the test binary itself.
        let exe = std::env::current_exe().expect("current exe");
        let bytes = std::fs::read(exe).expect("read test binary");
        let needs = dynamic_needs(&bytes).expect("parse");
        assert!(
            needs.libraries.iter().any(|lib| lib == "libc.so.6"),
            "{needs:?}"
        );
        assert_eq!(
            needs.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(dynamic_needs(b"not an elf file").is_err());
        assert!(module_depends(b"\x7fELF\x02\x01\x01").is_err());
    }
}
