# Spack recipe for dyadfs. Metadata mirrors pyproject.toml (name, version, Python, dependencies);
# keep them in step (tests/test_packaging.py checks it).
#
#   spack repo add packaging/spack
#   spack install py-dyadfs +flux +ucx

from spack.package import *


class PyDyadfs(PythonPackage):
    """DYAD's producer/consumer data movement for HPC workflows, as a FUSE file system."""

    homepage = "https://github.com/dyadfs/dyadfs"
    git = "https://github.com/dyadfs/dyadfs.git"

    license("MIT")

    version("main", branch="main")
    version("0.1.0", tag="v0.1.0")

    variant("flux", default=True, description="Flux KVS backend (--kvs flux), through flux-core's Python bindings")
    variant("ucx", default=True, description="UCX transport (--transport ucx) through UCXX")

    depends_on("python@3.11:", type=("build", "run"))
    depends_on("py-setuptools@68:", type="build")
    depends_on("py-wheel", type="build")

    # FUSE: libfuse 3 at build time (pyfuse3 compiles against it) and at run time (fusermount3)
    depends_on("fuse@3:", type=("build", "link", "run"))
    depends_on("pkgconfig", type="build")
    depends_on("py-pyfuse3@3.3:", type=("build", "run"))
    depends_on("py-trio@0.23:", type=("build", "run"))
    depends_on("py-numpy@1.24:", type=("build", "run"))
    depends_on("py-inotify-simple@1.3:", type=("build", "run"))
    depends_on("py-mmh3@4:", type=("build", "run"))

    # Flux: flux-core ships the matching Python bindings (the PyPI flux-python must match it)
    depends_on("flux-core", when="+flux", type=("build", "link", "run"))
    # UCX: a site's UCX (with its InfiniBand/RoCE support) under UCXX
    depends_on("ucx", when="+ucx", type=("build", "link", "run"))
    depends_on("py-ucxx", when="+ucx", type=("build", "run"))

    def setup_run_environment(self, env):
        if self.spec.satisfies("+flux"):
            env.prepend_path("PYTHONPATH", join_path(self.spec["flux-core"].prefix.lib,
                                                     "python{0}".format(self.spec["python"].version.up_to(2)),
                                                     "site-packages"))
