# Included by llama.cpp's own project() call (CMAKE_PROJECT_llama.cpp_INCLUDE) when pip builds the
# llama-cpp-python source distribution for the engine's ggml runner (see the Makefile).
#
# llama-cpp-python's CMakeLists.txt forces LLAMA_BUILD_COMMON=ON in the cache, and the `common`
# library (argument parsing, chat templates, JSON schema, HTTP download, with cpp-httplib) was
# 61% of the build's compile time on a 2-core host, while the Python bindings load only libllama
# and libggml*. A normal variable set here, in llama.cpp's directory scope, shadows the cached
# value (option() honours it, policy CMP0077), so neither `common` nor cpp-httplib is configured,
# built or installed.
set(LLAMA_BUILD_COMMON OFF)
