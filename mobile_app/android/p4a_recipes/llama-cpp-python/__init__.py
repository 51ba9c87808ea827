"""python-for-android recipe for llama-cpp-python, the on-device drafter's runtime (not in p4a itself).

llama-cpp-python is a ctypes binding: its Python package loads `libllama.so` (which needs ggml's
libraries) from `llama_cpp/lib` at import, and builds no CPython extension. So this recipe
cross-compiles llama.cpp's shared libraries (the copy vendored in the sdist, the version the
binding was written against) with the NDK's CMake toolchain and installs the pure-Python package
with the libraries beside it; the libraries also go to the APK's native library folder, where
Android's linker finds a library's dependencies. Written for python-for-android master (May 2026);
not built on the machine that wrote it (no Android SDK there).
"""

import glob
import os
import shutil
from multiprocessing import cpu_count
from os.path import exists, join

import sh
from pythonforandroid.logger import shprint
from pythonforandroid.recipe import Recipe
from pythonforandroid.util import current_directory

LIBRARIES = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so")


class LlamaCppPythonRecipe(Recipe):
    version = "0.3.36"  # as pinned in pyproject.toml: the drafter reads logits through its low-level API
    url = "https://files.pythonhosted.org/packages/source/l/llama_cpp_python/llama_cpp_python-{version}.tar.gz"
    depends = ["python3", "numpy"]
    built_libraries = {name: "build-android/bin" for name in LIBRARIES}
    need_stl_shared = True  # llama.cpp is C++: ship libc++_shared.so

    def should_build(self, arch):
        return super().should_build(arch) or not exists(join(self.ctx.get_site_packages_dir(arch), "llama_cpp"))

    def build_arch(self, arch):
        source = self.get_build_dir(arch.arch)
        build = join(source, "build-android")
        cmake_args = [
            "-S", join(source, "vendor", "llama.cpp"), "-B", build,
            f"-DCMAKE_TOOLCHAIN_FILE={join(self.ctx.ndk_dir, 'build', 'cmake', 'android.toolchain.cmake')}",
            f"-DANDROID_ABI={arch.arch}",
            f"-DANDROID_PLATFORM=android-{self.ctx.ndk_api}",
            "-DANDROID_STL=c++_shared",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_BUILD_COMMON=OFF",  # also turns off LLAMA_CURL (no libcurl on the device)
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DGGML_NATIVE=OFF",  # cross-compiling: the build machine's CPU says nothing about the phone's
            "-DGGML_OPENMP=OFF",  # ggml's own thread pool; the NDK's libomp would have to be shipped
            "-DGGML_LLAMAFILE=ON",
        ]
        env = os.environ.copy()  # the NDK toolchain file sets the compilers; p4a's CC/CFLAGS would fight it
        with current_directory(source):
            shprint(sh.Command("cmake"), *cmake_args, _env=env)
            shprint(sh.Command("cmake"), "--build", build, "--config", "Release", "-j", str(cpu_count()), _env=env)
        self.install_python_package(arch, source, build)

    def install_python_package(self, arch, source, build):
        target = join(self.ctx.get_site_packages_dir(arch), "llama_cpp")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(join(source, "llama_cpp"), target, ignore=shutil.ignore_patterns("__pycache__", "lib"))
        os.makedirs(join(target, "lib"), exist_ok=True)
        for library in glob.glob(join(build, "bin", "*.so")):
            shutil.copy(library, join(target, "lib"))
        # Python 3.13+ reports sys.platform == "android", which the binding's loader does not know;
        # the libraries are ordinary Linux shared objects.
        loader = join(target, "_ctypes_extensions.py")
        with open(loader) as f:
            code = f.read()
        linux = 'sys.platform.startswith("linux")'
        if linux in code:
            code = code.replace(linux, 'sys.platform.startswith(("linux", "android"))', 1)
            with open(loader, "w") as f:
                f.write(code)


recipe = LlamaCppPythonRecipe()
