# Sourced by the scripts/gpu/*.sh scripts: makes `import llmexec` work on a machine where the
# project is not installed (the device machine has torch, triton and pytest, but no package
# index to install from). Builds a throwaway folder that maps the packages the way
# pyproject.toml's package-dir does, with symlinks into this checkout, and puts it first on
# PYTHONPATH. Expects to be sourced from the repository root.
_llmexec_repo=$PWD
_llmexec_site=$(mktemp -d)
mkdir "$_llmexec_site/llmexec"
for _entry in "$_llmexec_repo"/src/llmexec/*; do
  ln -s "$_entry" "$_llmexec_site/llmexec/"
done
ln -s "$_llmexec_repo/kernels" "$_llmexec_site/llmexec/kernels"
for _service in loader runner scheduler; do
  ln -s "$_llmexec_repo/services/$_service" "$_llmexec_site/llmexec/$_service"
done
export PYTHONPATH="$_llmexec_site${PYTHONPATH:+:$PYTHONPATH}"
unset _entry _service
