//! Fetching pinned packages by name with each registry's own client, caching them, and
//! unpacking them.
//!
//! Every package is pinned by name, version and the blake3 of the downloaded file, so a corpus
//! built today and one built next year from the same pins are byte-identical (or the build
//! fails, naming the package whose content changed).

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which registry, and which kind of file from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Registry {
    /// An npm tarball (`npm pack`).
    Npm,
    /// A Python wheel (`pip download --only-binary :all:`), a zip file.
    PypiWheel,
    /// A Python source distribution (`pip download --no-binary :all:`), never installed.
    PypiSdist,
    /// A Debian binary package (`apt-get download`), unpacked with `dpkg-deb -x`.
    Debian,
}

impl Registry {
    fn slug(self) -> &'static str {
        match self {
            Registry::Npm => "npm",
            Registry::PypiWheel => "pypi-wheel",
            Registry::PypiSdist => "pypi-sdist",
            Registry::Debian => "debian",
        }
    }
}

/// A package pinned by name, version and content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageRef {
    pub registry: Registry,
    pub name: &'static str,
    pub version: &'static str,
    /// blake3 (hex) of the downloaded package file.
    pub blake3: &'static str,
}

impl PackageRef {
    /// `name@version` in the registry's own spelling.
    pub fn spec(&self) -> String {
        match self.registry {
            Registry::Npm => format!("{}@{}", self.name, self.version),
            Registry::PypiWheel | Registry::PypiSdist => format!("{}=={}", self.name, self.version),
            Registry::Debian => format!("{}={}", self.name, self.version),
        }
    }

    fn cache_dir(&self, download_dir: &Path) -> PathBuf {
        let name: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        download_dir.join(format!(
            "{}-{}-{}",
            self.registry.slug(),
            name,
            self.version
        ))
    }
}

/// A downloaded package file whose content matched its pin.
#[derive(Debug, Clone)]
pub struct FetchedPackage {
    pub package: PackageRef,
    pub file: PathBuf,
    pub blake3: String,
}

/// The package file, downloaded into `download_dir` unless a copy with the pinned blake3 is
/// already there.
pub fn fetch(
    package: &PackageRef,
    download_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<FetchedPackage> {
    let dir = package.cache_dir(download_dir);
    if let Some(file) = cached_file(&dir)? {
        let hash = hash_file(&file)?;
        if hash == package.blake3 {
            progress(&format!("{}: cached at {}", package.spec(), file.display()));
            return Ok(FetchedPackage {
                package: *package,
                file,
                blake3: hash,
            });
        }
        progress(&format!(
            "{}: cached file {} has blake3 {hash}, expected {}; downloading again",
            package.spec(),
            file.display(),
            package.blake3
        ));
        std::fs::remove_file(&file)
            .with_context(|| format!("cannot remove stale download {}", file.display()))?;
    }

    progress(&format!("{}: downloading", package.spec()));
    let staging = dir.join("downloading");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    download_into(package, &staging)?;
    let downloaded = single_file(&staging)?.with_context(|| {
        format!(
            "{}: the download left no file in {}",
            package.spec(),
            staging.display()
        )
    })?;
    let hash = hash_file(&downloaded)?;
    ensure!(
        hash == package.blake3,
        "{}: downloaded file {} has blake3 {hash} but the pin is {}; the registry's content \
         changed, so this corpus can no longer be reproduced from it (inspect the file, then \
         update the pin deliberately)",
        package.spec(),
        downloaded.display(),
        package.blake3
    );
    let file = dir.join(downloaded.file_name().expect("a file has a name"));
    crate::atomic::rename_into(&downloaded, &file, true).with_context(|| {
        format!(
            "cannot move {} into {}",
            downloaded.display(),
            dir.display()
        )
    })?;
    std::fs::remove_dir_all(&staging).ok();
    Ok(FetchedPackage {
        package: *package,
        file,
        blake3: hash,
    })
}

/// Unpacks the package into a fresh `unpacked/` folder beside it and returns that folder.
pub fn unpack(fetched: &FetchedPackage) -> Result<PathBuf> {
    let dir = fetched
        .file
        .parent()
        .expect("a cached package has a folder");
    let target = dir.join("unpacked");
    if target.exists() {
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("cannot clear {}", target.display()))?;
    }
    std::fs::create_dir_all(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    let file = fetched.file.as_os_str();
    let mut command = match fetched.package.registry {
        Registry::Npm | Registry::PypiSdist => {
            let mut c = Command::new(require_tool("tar", "unpacking .tar.gz packages")?);
            c.arg("-xzf").arg(file).arg("-C").arg(&target);
            c
        }
        Registry::PypiWheel => {
            let mut c = Command::new(require_tool("unzip", "unpacking Python wheels")?);
            c.arg("-q").arg(file).arg("-d").arg(&target);
            c
        }
        Registry::Debian => {
            let mut c = Command::new(require_tool("dpkg-deb", "unpacking Debian packages")?);
            c.arg("-x").arg(file).arg(&target);
            c
        }
    };
    run(
        &mut command,
        &format!("unpacking {}", fetched.file.display()),
    )?;
    Ok(target)
}

pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap(path)
        .with_context(|| format!("cannot hash {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The full path of `tool` on PATH, or an error saying which tool is missing and why it is
/// needed.
pub fn require_tool(tool: &str, needed_for: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!("`{tool}` was not found on PATH; it is needed for {needed_for}: install it")
        })
}

fn download_into(package: &PackageRef, dir: &Path) -> Result<()> {
    let spec = package.spec();
    let mut command = match package.registry {
        Registry::Npm => {
            let mut c = Command::new(require_tool("npm", &format!("downloading {spec}"))?);
            c.args(["pack", "--silent", &spec]);
            c
        }
        Registry::PypiWheel | Registry::PypiSdist => {
            let pip = require_tool("pip3", &format!("downloading {spec}"))
                .or_else(|_| require_tool("pip", &format!("downloading {spec}")))?;
            let binary = if package.registry == Registry::PypiWheel {
                "--only-binary"
            } else {
                "--no-binary"
            };
            let mut c = Command::new(pip);
            c.args([
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                binary,
                ":all:",
                "-d",
                ".",
                &spec,
            ]);
            c
        }
        Registry::Debian => {
            let mut c = Command::new(require_tool("apt-get", &format!("downloading {spec}"))?);
            c.args(["download", &spec]);
            c
        }
    };
    command.current_dir(dir);
    run(&mut command, &format!("downloading {spec}"))
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("{what}: cannot start {:?}", command.get_program()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!("{what}: {:?} failed ({}):\n{tail}", command, output.status);
    }
    Ok(())
}

/// The one package file in a cache folder, if any (the `unpacked/` and `downloading/` folders
/// are not files).
fn cached_file(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.exists() {
        return Ok(None);
    }
    single_file(dir)
}

fn single_file(dir: &Path) -> Result<Option<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    match files.len() {
        0 => Ok(None),
        1 => Ok(files.pop()),
        _ => bail!(
            "{} holds {} files where one package file was expected; remove the extra files",
            dir.display(),
            files.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_file_with_the_pinned_hash_is_used_without_downloading() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"pretend tarball";
        let package = PackageRef {
            // A registry client that does not exist: reaching the download step would fail.
            registry: Registry::Npm,
            name: "@example/never-downloaded",
            version: "1.2.3",
            blake3: Box::leak(blake3::hash(content).to_hex().to_string().into_boxed_str()),
        };
        let cache = package.cache_dir(dir.path());
        assert!(cache.ends_with("npm-_example_never-downloaded-1.2.3"));
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("example-never-downloaded-1.2.3.tgz"), content).unwrap();
        let mut messages = Vec::new();
        let fetched = fetch(&package, dir.path(), &mut |m: &str| {
            messages.push(m.to_string())
        })
        .unwrap();
        assert_eq!(fetched.blake3, package.blake3);
        assert!(messages[0].contains("cached"), "{messages:?}");
    }

    #[test]
    fn a_missing_tool_is_named_in_the_error() {
        let err = require_tool("no-such-tool-7f3a", "unpacking test packages").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("`no-such-tool-7f3a`"), "{message}");
        assert!(message.contains("unpacking test packages"), "{message}");
    }

    #[test]
    fn registry_specs_use_each_clients_spelling() {
        let mut package = PackageRef {
            registry: Registry::Npm,
            name: "pkg",
            version: "1.0",
            blake3: "",
        };
        assert_eq!(package.spec(), "pkg@1.0");
        package.registry = Registry::PypiSdist;
        assert_eq!(package.spec(), "pkg==1.0");
        package.registry = Registry::Debian;
        assert_eq!(package.spec(), "pkg=1.0");
    }
}
