#!/bin/bash
# Provisions one control-plane VM of the Vagrant test environment (vagrant/Vagrantfile), as
# root: Kubernetes prerequisites, cpha, then kubeadm through the endpoint cpha serves. The cpha
# steps are the ones cloud-init/init.yaml and join.yaml run, in the same order.
#
#   provision.sh init|join ENDPOINT
#
# Files come from /tmp/cpha-provision (uploaded by the Vagrantfile). KUBERNETES_MINOR (v1.30)
# selects the Kubernetes package stream.
set -euo pipefail

role=${1:?usage: provision.sh init|join ENDPOINT}
endpoint=${2:?usage: provision.sh init|join ENDPOINT}
minor=${KUBERNETES_MINOR:?KUBERNETES_MINOR is not set}
src=/tmp/cpha-provision
case $role in init | join) ;; *) echo "provision.sh: role must be init or join, not $role" >&2; exit 64 ;; esac

export DEBIAN_FRONTEND=noninteractive

# --- Kubernetes prerequisites (what a kubeadm-ready image would already have) ---------------
# kubelet refuses to run with swap on.
swapoff -a
sed -i '/\sswap\s/ s/^#*/#/' /etc/fstab

cat >/etc/modules-load.d/kubernetes.conf <<'EOF'
overlay
br_netfilter
EOF
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/80-kubernetes.conf <<'EOF'
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
EOF

apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    ca-certificates curl gpg containerd conntrack socat ebtables ethtool \
    haproxy nftables keepalived >/dev/null

# kubeadm configures the kubelet for the systemd cgroup driver; containerd must match.
mkdir -p /etc/containerd
containerd config default | sed 's/SystemdCgroup = false/SystemdCgroup = true/' >/etc/containerd/config.toml
systemctl restart containerd

# Kubernetes' own package repository, as its installation guide describes.
install -d -m 0755 /etc/apt/keyrings
curl -fsSL "https://pkgs.k8s.io/core:/stable:/$minor/deb/Release.key" |
    gpg --batch --yes --dearmor -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/$minor/deb/ /" \
    >/etc/apt/sources.list.d/kubernetes.list
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends kubelet kubeadm kubectl >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# --- cpha's files, where cloud-init writes them ------------------------------------------------
install -D -m 0755 "$src/cpha" /usr/local/bin/cpha
install -D -m 0755 "$src/cpha-bootstrap" /usr/local/sbin/cpha-bootstrap
install -D -m 0644 "$src/cpha.service" /etc/systemd/system/cpha.service
install -D -m 0644 "$src/haproxy-cpha.conf" /etc/systemd/system/haproxy.service.d/cpha.conf
install -D -m 0644 "$src/keepalived-cpha.conf" /etc/systemd/system/keepalived.service.d/cpha.conf
install -D -m 0644 "$src/config.yaml" /etc/cpha/config.yaml
# The binary is already in place: nothing to download.
printf 'CPHA_URL=\nCPHA_SHA256=\n' >/etc/cpha/install.env
{
    echo "CONTROL_PLANE_ENDPOINT=$endpoint"
    cat "$src/join.env"
} >/etc/cpha/site.env
chmod 0600 /etc/cpha/site.env
echo 'net.ipv4.ip_forward = 1' >/etc/sysctl.d/90-cpha.conf
if [ "$role" = init ]; then
    # The CA made by the Vagrantfile: kubeadm init uses it, and the joining VMs pin its hash.
    install -D -m 0644 "$src/ca.crt" /etc/kubernetes/pki/ca.crt
    install -D -m 0600 "$src/ca.key" /etc/kubernetes/pki/ca.key
fi
rm -rf "$src"

# --- cpha before kubeadm: the same steps as cloud-init's runcmd ---------------------------------
# Only our two files, key by key: `sysctl --system` exits 1 on any missing key of any file.
SYSCTL_FILE=/etc/sysctl.d/80-kubernetes.conf cpha-bootstrap sysctl
cpha-bootstrap sysctl
cpha-bootstrap install
cpha-bootstrap node-env
systemctl daemon-reload
# Returns once cpha is READY: the endpoint answers through the bootstrap forward.
systemctl enable --now cpha
systemctl enable haproxy
systemctl restart haproxy
# keepalived with the keepalived.conf cpha wrote: the virtual IP, taken by cp1, joined as a
# backup by cp2 and cp3.
systemctl enable keepalived
systemctl restart keepalived
if [ "$role" = init ]; then
    # kubeadm writes the endpoint into every kubeconfig: this VM must hold its address first.
    cpha-bootstrap wait-vip
    cpha-bootstrap kubeadm-init
else
    cpha-bootstrap kubeadm-join
fi
# The agent's own token, then this VM into the member list (cp1 creates the ConfigMap).
cpha-bootstrap identity
cpha-bootstrap register
cpha status
